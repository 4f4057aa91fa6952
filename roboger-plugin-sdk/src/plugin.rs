//! Writing a plugin: implement [`Plugin`] and call [`run`] from `main`.
//!
//! [`run`] speaks the protocol on stdin/stdout, hands `send` a typed
//! [`Event`] and every method a [`Host`] for callbacks into the server,
//! sends `tracing` logs to stderr (which the server copies into its log,
//! tagged with the plugin's name), and exits when stdin closes or the
//! server says `shutdown`, so a plugin never outlives its server.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use futures_util::FutureExt;
use jsonrpsee::core::RpcResult;
use jsonrpsee::types::ErrorObjectOwned;
use serde_json::Value;

use crate::protocol::{
    self, BucketObject, HostApiClient, HttpResponse, Manifest, PluginApiServer, codes,
};
use crate::rpc::{Client, NotificationHandler, Peer, PeerOptions};

/// What a plugin method reports when it fails.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The input (a config) is not acceptable; the user sees the message.
    #[error("{0}")]
    Rejected(String),
    /// The work failed (the server retries deliveries).
    #[error("{0}")]
    Failed(String),
    /// The work failed, and the target asked for at least this long
    /// before the next try (an HTTP `Retry-After`): the server's next try
    /// of the delivery is no sooner, within its `delivery.retry-max`.
    #[error("{0}")]
    Later(String, std::time::Duration),
}

impl PluginError {
    /// Shorthand for [`PluginError::Rejected`].
    pub fn rejected(msg: impl Into<String>) -> Self {
        PluginError::Rejected(msg.into())
    }
    /// Shorthand for [`PluginError::Failed`].
    pub fn failed(msg: impl std::fmt::Display) -> Self {
        PluginError::Failed(msg.to_string())
    }
}

impl From<PluginError> for ErrorObjectOwned {
    fn from(e: PluginError) -> Self {
        match e {
            PluginError::Rejected(m) => ErrorObjectOwned::owned(codes::REJECTED, m, None::<()>),
            PluginError::Failed(m) => ErrorObjectOwned::owned(codes::FAILED, m, None::<()>),
            PluginError::Later(m, wait) => {
                ErrorObjectOwned::owned(codes::FAILED, m, Some(protocol::retry_after_data(wait)))
            }
        }
    }
}

/// One event for one endpoint, as `send` receives it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Event {
    /// The endpoint's configuration.
    pub config: Value,
    /// Unique per event (a UUID); the same on a retried delivery.
    pub event_id: String,
    pub addr: String,
    pub addr_id: i64,
    pub msg: String,
    pub subject: String,
    /// `"{LEVEL} {sender}{@location}{: subject}"`
    pub formatted_subject: String,
    pub level: u8,
    pub level_name: String,
    pub location: Option<String>,
    pub tag: Option<String>,
    pub sender: Option<String>,
    /// The media's bytes.
    pub media: Option<Vec<u8>>,
    /// The media as the base64 text it arrived as.
    pub media_encoded: Option<String>,
    pub media_fname: Option<String>,
    /// How many Roboger servers forwarded the event before this one took
    /// it: 0 when it was pushed here directly. The chain plugin sends
    /// one more in [`crate::protocol::HOPS_HEADER`].
    pub hops: u16,
}

impl Event {
    /// A string the endpoint's config must have for this delivery (the
    /// schema may allow an empty config, as robogerctl creates endpoints
    /// before it applies their config).
    pub fn config_str(&self, key: &str) -> Result<&str, PluginError> {
        self.config
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| PluginError::failed(format!("the endpoint has no {key}")))
    }
}

/// A request to one of the plugin's HTTP routes.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRequest {
    pub method: String,
    /// The path below `/plugin/{name}`.
    pub path: String,
    pub query: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// The client's real IP (per the server's `ip-header` and `ip-header-from`).
    pub client_ip: Option<String>,
}

/// Who a plugin is, for the handshake.
#[derive(Clone, Debug, Default)]
pub struct Info {
    pub name: &'static str,
    pub version: &'static str,
    pub description: &'static str,
    pub url: Option<&'static str>,
    /// Whether the plugin serves HTTP routes.
    pub http: bool,
    /// The JSON Schema of its endpoint config, as JSON text (e.g. the
    /// `include_str!` of the file its validator is compiled from), sent
    /// in the manifest for the server's console.
    pub config_schema: Option<&'static str>,
    /// The JSON Schema of its plugin config, likewise (its `writeOnly`
    /// fields are secrets the server keeps out of its logs).
    pub plugin_config_schema: Option<&'static str>,
}

/// A Roboger plugin. Only [`Plugin::info`] and [`Plugin::send`] are
/// required; the others default to accepting everything and doing
/// nothing, as an absent method does in the original.
#[async_trait::async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// Name, version and description shown by `GET /manage/v2/plugin`.
    fn info(&self) -> Info;

    /// Delivers one event.
    async fn send(&self, event: Event, host: &Host) -> Result<(), PluginError>;

    /// Checks the global config (default: refuse any, like plugins
    /// without options in the original).
    async fn validate_plugin_config(
        &self,
        plugin_config: &Value,
        _host: &Host,
    ) -> Result<(), PluginError> {
        match plugin_config {
            Value::Null => Ok(()),
            Value::Object(m) if m.is_empty() => Ok(()),
            _ => Err(PluginError::rejected(
                "this plugin has no configuration options",
            )),
        }
    }

    /// Takes the global config.
    async fn load(&self, _plugin_config: &Value, _host: &Host) -> Result<(), PluginError> {
        Ok(())
    }

    /// Checks an endpoint's config.
    async fn validate_config(&self, _config: &Value, _host: &Host) -> Result<(), PluginError> {
        Ok(())
    }

    /// Removes expired state.
    async fn cleanup(&self, _host: &Host) -> Result<(), PluginError> {
        Ok(())
    }

    /// Serves `/plugin/{name}/...` (only called when `info().http`).
    async fn http(&self, _req: HttpRequest, _host: &Host) -> Result<HttpResponse, PluginError> {
        Ok(HttpResponse {
            status: 404,
            ..Default::default()
        })
    }
}

/// Callbacks into the server, usable from any plugin method.
#[derive(Clone)]
pub struct Host {
    client: Arc<Client>,
    /// The server's timeout, asked once: it is fixed for the server's run,
    /// and HTTP plugins need it on every send.
    timeout: Arc<tokio::sync::OnceCell<f64>>,
}

fn failed(e: impl std::fmt::Display) -> PluginError {
    PluginError::Failed(e.to_string())
}

impl Host {
    fn new(client: Arc<Client>) -> Host {
        Host {
            client,
            timeout: Arc::default(),
        }
    }

    /// The raw client, for calls this type has no method for.
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// Logs through the server's log.
    pub async fn log(&self, level: &str, message: &str) -> Result<(), PluginError> {
        self.client
            .log(Value::from(level), message.to_string())
            .await
            .map_err(failed)
    }

    /// The server's default timeout in seconds (asked once, then cached).
    pub async fn get_timeout(&self) -> Result<f64, PluginError> {
        self.timeout
            .get_or_try_init(|| async { self.client.get_timeout().await.map_err(failed) })
            .await
            .copied()
    }

    /// How long a call may take here: nine tenths of the server's
    /// timeout, so that its answer, a timeout's included, reaches the
    /// server before the server gives up on it, and a batch's answer
    /// arrives with the events that went well in it. HTTP requests, SMTP
    /// sessions and commands are given this.
    pub async fn call_budget(&self) -> std::time::Duration {
        let secs = self.get_timeout().await.unwrap_or(5.0) * 0.9;
        std::time::Duration::try_from_secs_f64(secs).unwrap_or(std::time::Duration::from_secs(5))
    }

    /// The server's public base URL, if configured (no trailing `/`).
    pub async fn get_url(&self) -> Result<Option<String>, PluginError> {
        self.client.get_url().await.map_err(failed)
    }

    /// Stores a bucket object; returns its id. `expires` is seconds, from
    /// 1 to ten years; `None` takes the server's `bucket.default-expires`.
    /// On MySQL, an object that would outlive 2038-01-19 03:14:07 UTC is
    /// refused.
    #[allow(clippy::too_many_arguments)]
    pub async fn bucket_put(
        &self,
        content: &[u8],
        addr_id: Option<i64>,
        mimetype: Option<&str>,
        fname: Option<&str>,
        public: bool,
        metadata: Option<Value>,
        expires: Option<i64>,
    ) -> Result<String, PluginError> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(content);
        self.client
            .bucket_put(
                b64,
                addr_id,
                mimetype.map(str::to_string),
                fname.map(str::to_string),
                Some(public),
                metadata,
                expires,
            )
            .await
            .map_err(failed)
    }

    /// Reads a bucket object.
    pub async fn bucket_get(&self, object_id: &str) -> Result<BucketObject, PluginError> {
        self.client
            .bucket_get(object_id.to_string(), None)
            .await
            .map_err(failed)
    }

    /// Calls another plugin's method.
    pub async fn call_plugin(
        &self,
        plugin: &str,
        method: &str,
        params: Value,
    ) -> Result<Value, PluginError> {
        self.client
            .call_plugin(plugin.to_string(), method.to_string(), Some(params))
            .await
            .map_err(failed)
    }
}

struct Adapter<P> {
    plugin: Arc<P>,
    host: Host,
}

impl<P: Plugin> Adapter<P> {
    /// One event to the plugin's `send`, its media decoded.
    async fn deliver(&self, p: protocol::SendParams) -> RpcResult<()> {
        let media = match &p.media_encoded {
            Some(b) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| {
                        ErrorObjectOwned::owned(
                            codes::REJECTED,
                            format!("media is not base64: {e}"),
                            None::<()>,
                        )
                    })?,
            ),
            None => None,
        };
        let event = Event {
            config: p.config,
            event_id: p.event_id,
            addr: p.addr,
            addr_id: p.addr_id,
            msg: p.msg,
            subject: p.subject,
            formatted_subject: p.formatted_subject,
            level: p.level,
            level_name: p.level_name,
            location: p.location,
            tag: p.tag,
            sender: p.sender,
            media,
            media_encoded: p.media_encoded,
            media_fname: p.media_fname,
            hops: p.hops.unwrap_or(0),
        };
        // The server gives up on a call after its timeout, and on a whole
        // batch at once: a send still running just before then (a target
        // that never answers, with no timeout of its own) is dropped and
        // answered as failed, so that it neither stays in memory for good
        // nor takes the batch's other events down with it. What the
        // plugin bounds itself ([`Host::call_budget`]) ends first, with
        // its own words.
        let timeout = self.host.get_timeout().await.unwrap_or(5.0);
        let limit = std::time::Duration::try_from_secs_f64(timeout * 0.95)
            .unwrap_or(std::time::Duration::MAX);
        // A send that panics fails alone too, at once, with the panic's
        // words (the rest of the batch is answered as if it had not).
        let send = std::panic::AssertUnwindSafe(self.plugin.send(event, &self.host));
        match tokio::time::timeout(limit, send.catch_unwind()).await {
            Ok(Ok(r)) => rpc(r),
            Ok(Err(panic)) => rpc(Err(PluginError::failed(format!(
                "the plugin's send panicked: {}",
                crate::rpc::panic_message(&*panic)
            )))),
            Err(_) => rpc(Err(PluginError::failed(format!(
                "the send did not finish within {:.2} s, just under the server's timeout, and was dropped",
                limit.as_secs_f64()
            )))),
        }
    }
}

fn rpc<T>(r: Result<T, PluginError>) -> RpcResult<T> {
    r.map_err(Into::into)
}

#[async_trait::async_trait]
#[allow(clippy::too_many_arguments)]
impl<P: Plugin> PluginApiServer for Adapter<P> {
    async fn hello(
        &self,
        _server_version: String,
        protocol_version: String,
        egress: Option<protocol::Egress>,
    ) -> RpcResult<Manifest> {
        #[cfg(feature = "http")]
        crate::egress::set(&egress.unwrap_or_default());
        #[cfg(not(feature = "http"))]
        let _ = egress;
        if !protocol::compatible(&protocol_version) {
            return Err(ErrorObjectOwned::owned(
                codes::REJECTED,
                format!(
                    "protocol {protocol_version} is not compatible with {}",
                    protocol::PROTOCOL_VERSION
                ),
                None::<()>,
            ));
        }
        let info = self.plugin.info();
        let mut methods: Vec<String> = [
            "validate_plugin_config",
            "load",
            "validate_config",
            "send_batch",
            "cleanup",
        ]
        .into_iter()
        .map(str::to_string)
        .collect();
        if info.http {
            methods.push("http".into());
        }
        Ok(Manifest {
            protocol_version: protocol::PROTOCOL_VERSION.to_string(),
            name: info.name.to_string(),
            version: Some(info.version.to_string()),
            description: Some(info.description.to_string()),
            url: info.url.map(str::to_string),
            methods,
            http: info.http,
            config_schema: info
                .config_schema
                .and_then(|s| serde_json::from_str(s).ok()),
            plugin_config_schema: info
                .plugin_config_schema
                .and_then(|s| serde_json::from_str(s).ok()),
        })
    }

    async fn validate_plugin_config(&self, plugin_config: Value) -> RpcResult<()> {
        rpc(self
            .plugin
            .validate_plugin_config(&plugin_config, &self.host)
            .await)
    }

    async fn load(&self, plugin_config: Value) -> RpcResult<()> {
        rpc(self.plugin.load(&plugin_config, &self.host).await)
    }

    async fn validate_config(&self, config: Value) -> RpcResult<()> {
        rpc(self.plugin.validate_config(&config, &self.host).await)
    }

    async fn send(
        &self,
        config: Value,
        event_id: String,
        addr: String,
        addr_id: i64,
        msg: String,
        subject: String,
        formatted_subject: String,
        level: u8,
        level_name: String,
        location: Option<String>,
        tag: Option<String>,
        sender: Option<String>,
        media_encoded: Option<String>,
        media_fname: Option<String>,
        hops: Option<u16>,
    ) -> RpcResult<()> {
        self.deliver(protocol::SendParams {
            config,
            event_id,
            addr,
            addr_id,
            msg,
            subject,
            formatted_subject,
            level,
            level_name,
            location,
            tag,
            sender,
            media_encoded,
            media_fname,
            hops,
        })
        .await
    }

    async fn send_batch(
        &self,
        events: Vec<protocol::SendParams>,
    ) -> RpcResult<Vec<protocol::SendOutcome>> {
        // Concurrently, as the same events sent one by one would be.
        let sends = events.into_iter().map(|p| async move {
            match self.deliver(p).await {
                Ok(()) => protocol::SendOutcome::default(),
                Err(e) => protocol::SendOutcome {
                    error: Some(protocol::OutcomeError {
                        code: e.code(),
                        message: e.message().to_string(),
                        data: e.data().and_then(|d| serde_json::from_str(d.get()).ok()),
                    }),
                },
            }
        });
        Ok(futures_util::future::join_all(sends).await)
    }

    async fn cleanup(&self) -> RpcResult<()> {
        rpc(self.plugin.cleanup(&self.host).await)
    }

    async fn http(
        &self,
        method: String,
        path: String,
        query: String,
        headers: BTreeMap<String, String>,
        body: String,
        client_ip: Option<String>,
    ) -> RpcResult<HttpResponse> {
        let body = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| {
                ErrorObjectOwned::owned(
                    codes::REJECTED,
                    format!("body is not base64: {e}"),
                    None::<()>,
                )
            })?;
        let req = HttpRequest {
            method,
            path,
            query,
            headers,
            body,
            client_ip,
        };
        rpc(self.plugin.http(req, &self.host).await)
    }

    async fn ping(&self) -> RpcResult<()> {
        Ok(())
    }
}

/// Runs `plugin` on stdin/stdout until the server closes stdin or says
/// `shutdown`. Call it from `main`; it sets up logging to stderr.
pub fn run<P: Plugin>(plugin: P) -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .try_init();
    // One worker thread: a plugin is I/O-bound, and one worker spends as
    // little CPU per message as a current-thread runtime did in the
    // benchmark, while its latency stayed low (a current-thread runtime
    // tripled the push-to-delivery p99 at 2,000 events/s; BENCHMARKS.md).
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        // Calls with large media come in bursts: give the memory back.
        #[cfg(feature = "mimalloc")]
        let release = crate::allocator::spawn_periodic_release();
        match stdio_pipes() {
            Ok((read, write)) => serve(plugin, read, write).await,
            // Not pipes (a terminal, a file): tokio's blocking stdio.
            Err(_) => serve(plugin, tokio::io::stdin(), tokio::io::stdout()).await,
        }
        #[cfg(feature = "mimalloc")]
        release.abort();
    });
    // Pending blocking reads of stdin must not keep the process alive.
    rt.shutdown_background();
    std::process::ExitCode::SUCCESS
}

/// Stdin and stdout as non-blocking pipes on the runtime's reactor.
/// tokio's `stdin()`/`stdout()` hand every read and write to a blocking
/// thread, a thread switch per message; the server always gives its
/// plugins pipes, which epoll serves directly.
fn stdio_pipes() -> std::io::Result<(
    tokio::net::unix::pipe::Receiver,
    tokio::net::unix::pipe::Sender,
)> {
    use std::os::fd::AsFd;
    let read = std::io::stdin().as_fd().try_clone_to_owned()?;
    let write = std::io::stdout().as_fd().try_clone_to_owned()?;
    Ok((
        tokio::net::unix::pipe::Receiver::from_owned_fd(read)?,
        tokio::net::unix::pipe::Sender::from_owned_fd(write)?,
    ))
}

/// Serves `plugin` on any pair of streams until they close or `shutdown`
/// arrives (what [`run`] does on stdin/stdout).
pub async fn serve<P, R, W>(plugin: P, read: R, write: W)
where
    P: Plugin,
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let plugin = Arc::new(plugin);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let on_notification: NotificationHandler = Arc::new(move |method, _params| {
        if method == protocol::SHUTDOWN_NOTIFICATION {
            let _ = stop_tx.send(true);
        }
    });
    let peer = Peer::start(
        read,
        write,
        PeerOptions::default(),
        |client| {
            let host = Host::new(client);
            Adapter { plugin, host }.into_rpc().into()
        },
        on_notification,
    );
    tokio::select! {
        reason = peer.closed() => tracing::debug!("server connection closed: {reason}"),
        _ = stop_rx.wait_for(|s| *s) => tracing::debug!("shutdown requested"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    #[async_trait::async_trait]
    impl Plugin for Nothing {
        fn info(&self) -> Info {
            Info::default()
        }
        async fn send(&self, _e: Event, _h: &Host) -> Result<(), PluginError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_adapter_serves_exactly_the_protocol_methods() {
        let (a, _b) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(a);
        let noop: NotificationHandler = Arc::new(|_, _| {});
        let mut names = Vec::new();
        let _peer = Peer::start(
            r,
            w,
            PeerOptions::default(),
            |client| {
                let m = Adapter {
                    plugin: Arc::new(Nothing),
                    host: Host::new(client),
                }
                .into_rpc();
                names = m.method_names().map(str::to_string).collect();
                m.into()
            },
            noop,
        );
        names.sort();
        let mut want: Vec<String> = protocol::PLUGIN_METHODS
            .iter()
            .map(|s| s.to_string())
            .collect();
        want.sort();
        assert_eq!(names, want);
    }
}
