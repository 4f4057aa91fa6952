//! Server configuration: the original's `roboger.yml`, read unchanged, plus
//! the embedded default used when there is no file at all.
//!
//! Loading is strict: a key nobody knows, a wrong type, a bad URL or a bad
//! network is refused with a message naming the key. Keys the original had
//! and we have no use for are accepted and logged. The result is a
//! [`Config`] with every default filled in and every value checked, so the
//! rest of the server never re-validates it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use roboger_plugin_sdk::secret::url_without_secrets;
use serde::Deserialize;

/// The default listen address (the original's port, loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7719";
const DEFAULT_PORT: u16 = 7719;
const DEFAULT_TIMEOUT: f64 = 5.0;
const DEFAULT_BUCKET_EXPIRES: u64 = 86_400;
const DEFAULT_DB_POOL: u32 = 10;
const MASTER_KEY_FILE: &str = "master.key";
const SQLITE_FILE: &str = "roboger.db";

/// What went wrong while loading the configuration; each message names the
/// key (as a dotted path) or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown key or a wrong type.
    #[error("config file {path}: {key}: {message}")]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A value has the right type but is not acceptable.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// The data directory or master key file could not be prepared.
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------
// The file as written (original keys, kebab-case).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoot {
    roboger: FileRoboger,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileRoboger {
    db: Option<String>,
    url: Option<String>,
    listen: Option<String>,
    log_tracebacks: Option<bool>,
    ip_header: Option<String>,
    ip_header_from: Option<Vec<String>>,
    api_doc: Option<ApiDoc>,
    limits: Option<FileLimits>,
    bucket: Option<FileBucket>,
    secure_mode: Option<bool>,
    db_pool_size: Option<u32>,
    thread_pool_size: Option<u32>,
    timeout: Option<f64>,
    master: Option<FileMaster>,
    plugins: Option<Vec<FilePlugin>>,
    gunicorn: Option<BTreeMap<String, serde_yaml_ng::Value>>,
    plugin_max_line: Option<usize>,
    plugin_health_interval: Option<f64>,
    cleanup_interval: Option<u64>,
    node: Option<String>,
    node_timeout: Option<f64>,
    push_max_media: Option<usize>,
    body_budget: Option<usize>,
    event_retention: Option<u64>,
    delivery: Option<FileDelivery>,
    metrics: Option<FileMetrics>,
    egress: Option<FileEgress>,
    sandbox: Option<FileSandbox>,
}

/// `egress` (server-wide, or a plugin's own): CIDRs plugins' HTTP clients
/// may not, or may, connect to.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEgress {
    deny: Option<Vec<String>>,
    allow: Option<Vec<String>>,
}

/// `sandbox` (defaults for every plugin) or a plugin's own: its
/// process's limits and writable paths.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileSandbox {
    address_space: Option<u64>,
    open_files: Option<u64>,
    cpu_seconds: Option<u64>,
    writable: Option<Vec<PathBuf>>,
    landlock: Option<bool>,
    connect_ports: Option<Vec<u16>>,
}

/// `metrics`: who may read `/metrics` without a key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    allow: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileDelivery {
    max_attempts: Option<i32>,
    max_age: Option<u64>,
    retry_base: Option<f64>,
    retry_max: Option<f64>,
    concurrency: Option<usize>,
}

/// A plugin's `command`: its executable, or a list of the program and
/// its arguments (`[node, /opt/p/plugin.js]`).
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a path, or a list of the program and its arguments"
)]
enum FileCommand {
    Path(PathBuf),
    Line(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ApiDoc {
    Enabled(bool),
    Path(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    period: Option<Period>,
    reserve: Option<u32>,
    redis: Option<FileRedis>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Period {
    Seconds(u64),
    Named(String),
}

/// Where the limit counters live, as the original configured it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRedis {
    host: Option<String>,
    db: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileBucket {
    default_expires: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileMaster {
    key: Option<String>,
    allow: Option<Vec<String>>,
    slow_down: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "kebab-case")]
struct FilePlugin {
    name: String,
    #[serde(default)]
    config: Option<serde_json::Map<String, serde_json::Value>>,
    command: Option<FileCommand>,
    python: Option<String>,
    env: Option<BTreeMap<String, String>>,
    sha256: Option<String>,
    db: Option<bool>,
    max_inflight: Option<usize>,
    max_inflight_bytes: Option<usize>,
    egress: Option<FileEgress>,
    sandbox: Option<FileSandbox>,
}

// ---------------------------------------------------------------------------
// The checked result.

/// The complete, validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from (`None`: the embedded default).
    pub source: Option<PathBuf>,
    /// Directory for the default SQLite database and generated master key.
    pub data_dir: PathBuf,
    /// Database connection, already translated to our driver's URL form.
    pub db: DbUrl,
    /// Connection pool size (`db-pool-size`).
    pub db_pool_size: u32,
    /// Public base URL of this server (`url`), if configured.
    pub public_url: Option<url::Url>,
    /// Where to listen: `host:port`, or a Unix socket.
    pub listen: Listen,
    /// Header that carries the client's real IP (`ip-header`), if any.
    pub ip_header: Option<String>,
    /// The peers (proxies) whose `ip-header` is believed
    /// (`ip-header-from`; empty: every peer, as the original did).
    pub ip_header_from: Vec<IpNet>,
    /// Path the API documentation is served under; `None` when disabled.
    pub api_doc: Option<String>,
    /// Address limits, when configured.
    pub limits: Option<Limits>,
    /// Default lifetime of bucket objects.
    pub bucket_default_expires: Duration,
    /// Timeout for every external wait (plugin calls, database, HTTP).
    pub timeout: Duration,
    /// The master key of the management API.
    pub master_key: String,
    /// Networks allowed to use the management API (empty: any).
    pub master_allow: Vec<IpNet>,
    /// Whether wrong master keys from one address make its further
    /// attempts wait (`master.slow-down`, default on).
    pub master_slow_down: bool,
    /// Networks that may read `/metrics` without the master key
    /// (`metrics.allow`; empty: none).
    pub metrics_allow: Vec<IpNet>,
    /// Configured plugins, in file order.
    pub plugins: Vec<PluginConfig>,
    /// The longest message (line) a plugin may write.
    pub plugin_max_line: usize,
    /// How often running plugins are pinged.
    pub plugin_health_interval: Duration,
    /// How often expired bucket objects are deleted and plugins' `cleanup` runs.
    pub cleanup_interval: Duration,
    /// The largest media a push may carry (decoded bytes).
    pub push_max_media: usize,
    /// Bytes of request bodies read and handled at once, over all
    /// requests (`body-budget`).
    pub body_budget: usize,
    /// How long events are kept (cleanup removes older ones with nothing pending).
    pub event_retention: Duration,
    /// How deliveries are made and retried.
    pub delivery: DeliveryConfig,
    /// Human-readable notes to log once at start (ignored keys and the like).
    pub notices: Vec<String>,
    /// Set when the master key was generated by this load (print it once).
    pub generated_key: Option<PathBuf>,
    /// Set by [`Config::load_to_check`] when no master key is given or
    /// stored: where the first start will generate one (the key is empty).
    pub key_to_generate: Option<PathBuf>,
    /// The secrets given in the configuration file, or read from a file a
    /// value named, and where (not those given in the environment, nor
    /// a generated key): what [`crate::sandbox`] checks plugins cannot read.
    pub secrets: Vec<Secret>,
    /// The server's own files, which no plugin may read (each plugin's
    /// `sandbox.hidden`): the configuration file, the files secrets were
    /// read from, the data directory, a SQLite database and its journals.
    pub own_files: Vec<PathBuf>,
}

/// One of the server's secrets (the master key, a database URL with a
/// password), and the file it was given in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// What it is, as the log says it: "the master key".
    pub what: &'static str,
    /// The environment variable that can give it instead.
    pub variable: &'static str,
    /// The configuration file it is written in, or the file a value named.
    pub file: PathBuf,
}

/// A database URL in the form the driver takes, and which backend it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbUrl {
    /// The URL handed to sea-orm.
    pub url: String,
    /// Which backend.
    pub backend: DbBackend,
}

impl DbUrl {
    /// The file of a SQLite database (none for an in-memory one, or
    /// another backend).
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        let rest = self.url.strip_prefix("sqlite://")?;
        let path = rest.split('?').next()?;
        if path.is_empty() || path.starts_with(':') {
            return None;
        }
        Some(PathBuf::from(path))
    }
}

/// The supported database backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbBackend {
    Sqlite,
    Postgres,
    MySql,
}

/// Address limits (`limits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Length of one counting window.
    pub period: Duration,
    /// How the period is named in 429 messages (`hour`, `day`, `600 seconds`).
    pub period_name: String,
    /// Percent of each limit reserved for WARNING and above.
    pub reserve: u32,
    /// The Redis server holding the counters (`limits.redis`), as a URL;
    /// `None`: they are kept in the database.
    pub redis: Option<String>,
}

/// One configured plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// The plugin's name (what endpoints refer to).
    pub name: String,
    /// Its global configuration, handed to `validate_plugin_config` and `load`.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// An explicit executable; otherwise `roboger-plugin-NAME` is looked up.
    pub command: Option<PathBuf>,
    /// Arguments for `command` (the rest of its list form).
    pub args: Vec<String>,
    /// A seed-style Python module (`robogercontrib.foo`) to host with the
    /// bridge, `roboger-plugin-python` (or `command`), which gets it as
    /// its argument.
    pub python: Option<String>,
    /// Extra environment for the plugin process.
    pub env: BTreeMap<String, String>,
    /// The executable's expected SHA-256 (lower-case hex), if pinned.
    pub sha256: Option<String>,
    /// Whether the plugin may use `db_query`/`db_execute`.
    pub db: bool,
    /// Most calls in flight to this plugin at once.
    pub max_inflight: usize,
    /// Most bytes of media (as sent, base64) in calls in flight to this
    /// plugin at once (`max-inflight-bytes`).
    pub max_inflight_bytes: usize,
    /// What its HTTP client may connect to (its own `egress`, else the
    /// server's), sent to it in `hello`.
    pub egress: Egress,
    /// The limits and filesystem rules its process runs under.
    pub sandbox: Sandbox,
}

pub use roboger_plugin_sdk::protocol::Egress;

/// How a plugin's process is confined (set before its executable runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// `RLIMIT_AS`, bytes (`address-space`, in MiB in the file).
    pub address_space: u64,
    /// `RLIMIT_NOFILE` (`open-files`).
    pub open_files: u64,
    /// `RLIMIT_CPU`, seconds of CPU time in all (`cpu-seconds`); none by default.
    pub cpu_seconds: Option<u64>,
    /// Its own directory (`DATA_DIR/plugins/NAME`): its working directory
    /// and `TMPDIR`, always writable.
    pub data_dir: PathBuf,
    /// More paths it may write (`writable`).
    pub writable: Vec<PathBuf>,
    /// The server's own files, which it may not read (unless they are
    /// below a `writable` path): see [`Config::own_files`].
    pub hidden: Vec<PathBuf>,
    /// Whether the filesystem is read-only to it but for those (Landlock).
    pub landlock: bool,
    /// The only TCP ports it may connect to (`connect-ports`, Landlock);
    /// none: any. Empty: no TCP connection at all.
    pub connect_ports: Option<Vec<u16>>,
}

/// The default address space of a plugin process: generous, as
/// allocators reserve far more than they use (mimalloc reserves 1 GiB).
pub const DEFAULT_ADDRESS_SPACE_MIB: u64 = 4096;
/// The default open files of a plugin process.
pub const DEFAULT_OPEN_FILES: u64 = 1024;

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            address_space: DEFAULT_ADDRESS_SPACE_MIB * 1024 * 1024,
            open_files: DEFAULT_OPEN_FILES,
            cpu_seconds: None,
            data_dir: PathBuf::new(),
            writable: Vec::new(),
            hidden: Vec::new(),
            landlock: true,
            connect_ports: None,
        }
    }
}

/// Delivery and retry settings (`delivery`, `node`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryConfig {
    /// This server's name in delivery leases (`node`, default the host
    /// name); a restarted server takes back what its name holds.
    pub node: String,
    /// Attempts before a delivery is marked failed.
    pub max_attempts: i32,
    /// Age after which a failing delivery is marked failed.
    pub max_age: Duration,
    /// The first retry delay; it doubles on each failure.
    pub retry_base: Duration,
    /// The longest retry delay.
    pub retry_max: Duration,
    /// Deliveries in flight at once, over all plugins.
    pub concurrency: usize,
    /// How long a claimed delivery belongs to this server.
    pub lease: Duration,
    /// How often due deliveries are looked for.
    pub sweep_interval: Duration,
    /// How often this node writes its heartbeat.
    pub heartbeat: Duration,
    /// A node whose heartbeat is older than this is dead, and the others
    /// free its leases (`node-timeout`).
    pub node_timeout: Duration,
}

/// Default of a plugin's `max-inflight`. Each delivery in flight holds an
/// HTTP connection in an HTTP plugin (about 34 KiB); 48 keeps the webhook
/// plugin under 10 MiB at peak load with the same throughput as 64 in the
/// benchmark (BENCHMARKS.md). Slow endpoints need more: set it per plugin.
pub const DEFAULT_MAX_INFLIGHT: usize = 48;
/// Default of a plugin's `max-inflight-bytes`: media in calls in flight.
/// Each byte is held about three times over in the server while its call
/// is made (raw, base64, the request line) and as often in the plugin, so
/// 8 MiB keeps both within a few tens of MiB with a large backlog of media
/// events (BENCHMARKS.md).
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 8 * 1024 * 1024;
/// Default of `body-budget`: request bodies being read and handled at
/// once. A push with media is held about three times over while it is
/// decoded and stored, so 64 MiB keeps a burst of large pushes within a
/// few hundred MiB (BENCHMARKS.md).
pub const DEFAULT_BODY_BUDGET: usize = 64 * 1024 * 1024;
/// Default of `plugin-max-line`: the longest message a plugin may write.
pub const DEFAULT_PLUGIN_MAX_LINE: usize = 64 * 1024 * 1024;

impl PluginConfig {
    /// A plugin with no options but its name.
    pub fn named(name: &str) -> PluginConfig {
        PluginConfig {
            name: name.to_string(),
            config: Default::default(),
            command: None,
            args: Vec::new(),
            python: None,
            env: BTreeMap::new(),
            sha256: None,
            db: false,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            egress: Egress::default(),
            sandbox: Sandbox::default(),
        }
    }
}

/// The names of the plugins shipped with the server; the embedded default
/// configures each one whose executable sits next to the server binary.
pub const BUILTIN_PLUGINS: [&str; 6] = ["chain", "email", "shell", "slack", "telegram", "webhook"];

/// Environment variables that override the file, as in the original.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `ROBOGER_DB`
    pub db: Option<String>,
    /// `ROBOGER_MASTERKEY`
    pub master_key: Option<String>,
    /// `ROBOGER_DATA_DIR` (ours): where the embedded default keeps its files.
    pub data_dir: Option<PathBuf>,
}

impl Overrides {
    /// Reads the overrides from the process environment.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Overrides {
            db: var("ROBOGER_DB"),
            master_key: var("ROBOGER_MASTERKEY"),
            data_dir: var("ROBOGER_DATA_DIR").map(PathBuf::from),
        }
    }
}

impl Config {
    /// The keys (other than `plugins`) whose values differ in `other`:
    /// what a reload cannot apply without a restart.
    pub fn differences(&self, other: &Config) -> Vec<&'static str> {
        let (d, o) = (&self.delivery, &other.delivery);
        // The lease, the sweep and the heartbeat follow from `timeout`
        // and `node-timeout`, named on their own.
        let delivery = (
            d.max_attempts,
            d.max_age,
            d.retry_base,
            d.retry_max,
            d.concurrency,
        ) != (
            o.max_attempts,
            o.max_age,
            o.retry_base,
            o.retry_max,
            o.concurrency,
        );
        let checks: [(&'static str, bool); 24] = [
            ("db", self.db != other.db),
            ("db-pool-size", self.db_pool_size != other.db_pool_size),
            ("url", self.public_url != other.public_url),
            ("listen", self.listen != other.listen),
            ("ip-header", self.ip_header != other.ip_header),
            (
                "ip-header-from",
                self.ip_header_from != other.ip_header_from,
            ),
            ("api-doc", self.api_doc != other.api_doc),
            ("limits", self.limits != other.limits),
            (
                "bucket.default-expires",
                self.bucket_default_expires != other.bucket_default_expires,
            ),
            ("timeout", self.timeout != other.timeout),
            ("master.key", self.master_key != other.master_key),
            ("master.allow", self.master_allow != other.master_allow),
            (
                "master.slow-down",
                self.master_slow_down != other.master_slow_down,
            ),
            ("metrics.allow", self.metrics_allow != other.metrics_allow),
            (
                "plugin-max-line",
                self.plugin_max_line != other.plugin_max_line,
            ),
            (
                "plugin-health-interval",
                self.plugin_health_interval != other.plugin_health_interval,
            ),
            (
                "cleanup-interval",
                self.cleanup_interval != other.cleanup_interval,
            ),
            (
                "push-max-media",
                self.push_max_media != other.push_max_media,
            ),
            ("body-budget", self.body_budget != other.body_budget),
            (
                "event-retention",
                self.event_retention != other.event_retention,
            ),
            ("delivery", delivery),
            ("node", d.node != o.node),
            ("node-timeout", d.node_timeout != o.node_timeout),
            ("data directory", self.data_dir != other.data_dir),
        ];
        checks
            .into_iter()
            .filter_map(|(k, differs)| differs.then_some(k))
            .collect()
    }

    /// Loads `path` (or the embedded default when `None`), applies the
    /// environment overrides and checks every value. Creates the data
    /// directory and master key file only when they are needed.
    pub fn load(path: Option<&Path>, env: &Overrides) -> Result<Config, ConfigError> {
        Config::build(path, file_at(path)?, env, true)
    }

    /// Like [`Config::load`], for a command that serves nothing
    /// (`check-config`, `migrate`): it writes nothing. With no master key
    /// given or stored, none is generated: the key is empty and
    /// [`Config::key_to_generate`] says where the first start will put
    /// one.
    pub fn load_to_check(path: Option<&Path>, env: &Overrides) -> Result<Config, ConfigError> {
        Config::build(path, file_at(path)?, env, false)
    }

    /// Like [`Config::load`], from the text of a file that would be at
    /// `path` (the fuzz tests' entry).
    pub fn from_text(text: &str, path: &Path, env: &Overrides) -> Result<Config, ConfigError> {
        Config::build(Some(path), parse_text(text, path)?, env, true)
    }

    fn build(
        path: Option<&Path>,
        f: FileRoboger,
        env: &Overrides,
        generate_key: bool,
    ) -> Result<Config, ConfigError> {
        let mut notices = Vec::new();
        for (key, set) in [
            ("thread-pool-size", f.thread_pool_size.is_some()),
            ("secure-mode", f.secure_mode.is_some()),
            ("log-tracebacks", f.log_tracebacks.is_some()),
        ] {
            if set {
                notices.push(format!(
                    "roboger.{key} is accepted for compatibility and has no effect"
                ));
            }
        }
        let data_dir = env.data_dir.clone().unwrap_or_else(default_data_dir);

        let mut secrets_read = SecretsRead::default();
        let db_raw = secrets_read.read(
            ("roboger.db", "the database URL's password", "ROBOGER_DB"),
            (env.db.clone(), f.db),
            path,
            |url| url::Url::parse(url).is_ok_and(|u| u.password().is_some()),
        )?;
        let db = match db_raw {
            Some(raw) => translate_db_url(&raw)?,
            None => DbUrl {
                url: format!("sqlite://{}?mode=rwc", data_dir.join(SQLITE_FILE).display()),
                backend: DbBackend::Sqlite,
            },
        };
        let db_pool_size = f.db_pool_size.unwrap_or(DEFAULT_DB_POOL);
        if db_pool_size == 0 {
            return Err(invalid("roboger.db-pool-size", "must be at least 1"));
        }

        let public_url = match f.url {
            Some(u) => Some(
                url::Url::parse(&u)
                    .map_err(|e| invalid("roboger.url", format!("not a valid URL ({e}): {u}")))?,
            ),
            None => None,
        };

        let gunicorn_listen = match &f.gunicorn {
            Some(g) => {
                for k in g.keys().filter(|k| k.as_str() != "listen") {
                    notices.push(format!(
                        "roboger.gunicorn.{k} is accepted for compatibility and has no effect"
                    ));
                }
                match g.get("listen") {
                    None => None,
                    Some(serde_yaml_ng::Value::String(s)) => Some(s.clone()),
                    Some(_) => return Err(invalid("roboger.gunicorn.listen", "must be a string")),
                }
            }
            None => None,
        };
        let listen = match (f.listen, gunicorn_listen) {
            (Some(l), _) => normalize_listen("roboger.listen", &l)?,
            (None, Some(l)) => normalize_listen("roboger.gunicorn.listen", &l)?,
            (None, None) => Listen::Tcp(DEFAULT_LISTEN.to_string()),
        };

        let ip_header = match f.ip_header {
            Some(h) if h.trim().is_empty() => None,
            Some(h) => {
                http::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| invalid("roboger.ip-header", format!("not a header name: {h}")))?;
                Some(h)
            }
            None => None,
        };
        let ip_header_from = parse_nets(
            "roboger.ip-header-from",
            &f.ip_header_from.unwrap_or_default(),
        )?;
        if ip_header.is_none() && !ip_header_from.is_empty() {
            return Err(invalid(
                "roboger.ip-header-from",
                "names the proxies whose ip-header is believed, but ip-header is not set",
            ));
        }

        let api_doc = match f.api_doc {
            None | Some(ApiDoc::Enabled(true)) => Some("/".to_string()),
            Some(ApiDoc::Enabled(false)) => None,
            Some(ApiDoc::Path(p)) if p.starts_with('/') => Some(p),
            Some(ApiDoc::Path(p)) => {
                return Err(invalid(
                    "roboger.api-doc",
                    format!("must be a path starting with /, or false: {p}"),
                ));
            }
        };

        let limits = match f.limits {
            None => None,
            Some(l) => {
                let redis = l.redis.map(redis_url).transpose()?;
                let (period, period_name) = match l.period {
                    None => (Duration::from_secs(86_400), "day".to_string()),
                    Some(Period::Seconds(0)) => {
                        return Err(invalid(
                            "roboger.limits.period",
                            "must be more than 0 seconds",
                        ));
                    }
                    Some(Period::Seconds(s)) => (Duration::from_secs(s), format!("{s} seconds")),
                    Some(Period::Named(n)) => match n.as_str() {
                        "hour" => (Duration::from_secs(3600), n),
                        "day" => (Duration::from_secs(86_400), n),
                        other => match other.parse::<u64>() {
                            Ok(s) if s > 0 => (Duration::from_secs(s), format!("{s} seconds")),
                            _ => {
                                return Err(invalid(
                                    "roboger.limits.period",
                                    format!(
                                        "must be hour, day or a number of seconds, not {other:?}"
                                    ),
                                ));
                            }
                        },
                    },
                };
                let reserve = l.reserve.unwrap_or(0);
                if reserve > 100 {
                    return Err(invalid(
                        "roboger.limits.reserve",
                        "is a percentage, 0 to 100",
                    ));
                }
                Some(Limits {
                    period,
                    period_name,
                    reserve,
                    redis,
                })
            }
        };

        let bucket_default_expires = f
            .bucket
            .and_then(|b| b.default_expires)
            .unwrap_or(DEFAULT_BUCKET_EXPIRES);
        if !(1..=crate::bucket::MAX_EXPIRES.as_secs()).contains(&bucket_default_expires) {
            return Err(invalid(
                "roboger.bucket.default-expires",
                format!(
                    "must be between 1 and {} seconds (ten years)",
                    crate::bucket::MAX_EXPIRES.as_secs()
                ),
            ));
        }

        let timeout = f.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if !(0.1..=3600.0).contains(&timeout) {
            return Err(invalid(
                "roboger.timeout",
                "must be between 0.1 and 3600 seconds",
            ));
        }

        let (file_key, allow, master_slow_down) = match f.master {
            Some(m) => (
                m.key,
                m.allow.unwrap_or_default(),
                m.slow_down.unwrap_or(true),
            ),
            None => (None, Vec::new(), true),
        };
        let master_allow = parse_nets("roboger.master.allow", &allow)?;
        let metrics_allow = parse_nets(
            "roboger.metrics.allow",
            &f.metrics.and_then(|m| m.allow).unwrap_or_default(),
        )?;
        let (mut generated_key, mut key_to_generate) = (None, None);
        let given_key = secrets_read.read(
            ("roboger.master.key", "the master key", "ROBOGER_MASTERKEY"),
            (env.master_key.clone(), file_key),
            path,
            |_| true,
        )?;
        let master_key = match given_key {
            Some(k) => k,
            None if generate_key => {
                let (key, generated) = load_or_generate_key(&data_dir)?;
                if generated {
                    generated_key = Some(data_dir.join(MASTER_KEY_FILE));
                }
                key
            }
            None => stored_key(&data_dir)?.unwrap_or_else(|| {
                key_to_generate = Some(data_dir.join(MASTER_KEY_FILE));
                String::new()
            }),
        };
        if master_key.is_empty() && key_to_generate.is_none() {
            return Err(invalid("roboger.master.key", "must not be empty"));
        }

        let server_egress = egress("roboger.egress", f.egress.unwrap_or_default())?;
        let server_sandbox = sandbox(
            "roboger.sandbox",
            &Sandbox::default(),
            f.sandbox.unwrap_or_default(),
        )?;
        let listed = f.plugins.is_some();
        let mut plugins = match f.plugins {
            Some(list) => {
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::with_capacity(list.len());
                for (i, p) in list.into_iter().enumerate() {
                    if !valid_plugin_name(&p.name) {
                        return Err(invalid(
                            &format!("roboger.plugins[{i}].name"),
                            format!(
                                "plugin names are 1-40 characters a-z, 0-9, _ or -: {:?}",
                                p.name
                            ),
                        ));
                    }
                    if !seen.insert(p.name.clone()) {
                        return Err(invalid(
                            &format!("roboger.plugins[{i}].name"),
                            format!("plugin {} is configured twice", p.name),
                        ));
                    }
                    let sha256 = match p.sha256 {
                        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                            Some(h.to_ascii_lowercase())
                        }
                        Some(h) => {
                            return Err(invalid(
                                &format!("roboger.plugins[{i}].sha256"),
                                format!("not a SHA-256 in hex: {h:?}"),
                            ));
                        }
                        None => None,
                    };
                    if let Some(m) = &p.python {
                        let dotted = m.split('.').all(|part| {
                            part.chars()
                                .next()
                                .is_some_and(|c| c.is_alphabetic() || c == '_')
                                && part.chars().all(|c| c.is_alphanumeric() || c == '_')
                        });
                        if !dotted {
                            return Err(invalid(
                                &format!("roboger.plugins[{i}].python"),
                                "must be a Python module name, like robogercontrib.foo",
                            ));
                        }
                    }
                    let max_inflight = p.max_inflight.unwrap_or(DEFAULT_MAX_INFLIGHT);
                    if max_inflight == 0 {
                        return Err(invalid(
                            &format!("roboger.plugins[{i}].max-inflight"),
                            "must be at least 1",
                        ));
                    }
                    let key = |k: &str| format!("roboger.plugins[{i}].{k}");
                    let egress = match p.egress {
                        Some(e) => egress(&key("egress"), e)?,
                        None => server_egress.clone(),
                    };
                    let sandbox = sandbox(
                        &key("sandbox"),
                        &server_sandbox,
                        p.sandbox.unwrap_or_default(),
                    )?;
                    let (command, args) = match p.command {
                        Some(c) => {
                            let (exe, args) = plugin_command(&key("command"), c)?;
                            (Some(exe), args)
                        }
                        None => (None, Vec::new()),
                    };
                    out.push(PluginConfig {
                        egress,
                        sandbox,
                        config: p.config.unwrap_or_default(),
                        command,
                        args,
                        python: p.python,
                        env: p.env.unwrap_or_default(),
                        sha256,
                        db: p.db.unwrap_or(false),
                        max_inflight,
                        max_inflight_bytes: p
                            .max_inflight_bytes
                            .unwrap_or(DEFAULT_MAX_INFLIGHT_BYTES)
                            .max(1024),
                        ..PluginConfig::named(&p.name)
                    });
                }
                out
            }
            None if path.is_none() => builtin_plugins_next_to_binary(),
            None => Vec::new(),
        };
        let own_files = Config::own_files_of(path, &secrets_read.files, &data_dir, &db);
        for p in &mut plugins {
            if !listed {
                p.egress = server_egress.clone();
                p.sandbox = server_sandbox.clone();
            }
            p.sandbox.data_dir = data_dir.join("plugins").join(&p.name);
            p.sandbox.hidden = own_files.clone();
        }

        let plugin_max_line = f.plugin_max_line.unwrap_or(DEFAULT_PLUGIN_MAX_LINE);
        if plugin_max_line < 1024 {
            return Err(invalid(
                "roboger.plugin-max-line",
                "must be at least 1024 bytes",
            ));
        }

        let plugin_health_interval = f.plugin_health_interval.unwrap_or(10.0);
        if !(0.1..=3600.0).contains(&plugin_health_interval) {
            return Err(invalid(
                "roboger.plugin-health-interval",
                "must be between 0.1 and 3600 seconds",
            ));
        }

        let d = f.delivery.unwrap_or_default();
        let positive = |key: &str, v: Option<f64>, default: f64| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(default);
            if v > 0.0 && v <= 30.0 * 86_400.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(invalid(
                    key,
                    "must be a positive number of seconds (at most 30 days)",
                ))
            }
        };
        let node = f.node.unwrap_or_else(default_node);
        // The instance id (name, '#', 12 characters) must fit its column.
        if node.is_empty() || node.len() > 128 {
            return Err(invalid("roboger.node", "must be 1 to 128 characters"));
        }
        let node_timeout = positive("roboger.node-timeout", f.node_timeout, 3.0)?;
        if node_timeout < Duration::from_millis(500) {
            return Err(invalid(
                "roboger.node-timeout",
                "must be at least 0.5 seconds",
            ));
        }
        let delivery = DeliveryConfig {
            node,
            max_attempts: match d.max_attempts.unwrap_or(10) {
                n if n >= 1 => n,
                _ => {
                    return Err(invalid(
                        "roboger.delivery.max-attempts",
                        "must be at least 1",
                    ));
                }
            },
            max_age: positive(
                "roboger.delivery.max-age",
                d.max_age.map(|v| v as f64),
                86_400.0,
            )?,
            retry_base: positive("roboger.delivery.retry-base", d.retry_base, 0.5)?,
            retry_max: positive("roboger.delivery.retry-max", d.retry_max, 600.0)?,
            concurrency: match d.concurrency.unwrap_or(1024) {
                0 => {
                    return Err(invalid(
                        "roboger.delivery.concurrency",
                        "must be at least 1",
                    ));
                }
                n => n,
            },
            lease: Duration::from_secs_f64((timeout * 12.0).max(60.0)),
            sweep_interval: Duration::from_millis(250),
            heartbeat: (node_timeout / 3).min(Duration::from_secs(1)),
            node_timeout,
        };
        let push_max_media = f.push_max_media.unwrap_or(10 * 1024 * 1024);
        let cleanup_interval = f.cleanup_interval.unwrap_or(3600);
        if cleanup_interval == 0 {
            return Err(invalid(
                "roboger.cleanup-interval",
                "must be at least 1 second",
            ));
        }

        Ok(Config {
            source: path.map(Path::to_path_buf),
            cleanup_interval: Duration::from_secs(cleanup_interval),
            push_max_media,
            body_budget: f
                .body_budget
                .unwrap_or(DEFAULT_BODY_BUDGET)
                .max(1024 * 1024),
            event_retention: Duration::from_secs(f.event_retention.unwrap_or(7 * 86_400)),
            delivery,
            plugin_max_line,
            plugin_health_interval: Duration::from_secs_f64(plugin_health_interval),
            data_dir,
            db,
            db_pool_size,
            public_url,
            listen,
            ip_header,
            ip_header_from,
            api_doc,
            limits,
            bucket_default_expires: Duration::from_secs(bucket_default_expires),
            timeout: Duration::from_secs_f64(timeout),
            master_key,
            master_allow,
            master_slow_down,
            metrics_allow,
            plugins,
            notices,
            generated_key,
            key_to_generate,
            secrets: secrets_read.written,
            own_files,
        })
    }

    /// This configuration as a reload of `running` applies it: its
    /// plugins may read neither its own files nor those of `running`,
    /// which the server goes on using until it restarts (a changed
    /// database, key file or data directory takes effect then; see
    /// [`Config::differences`]).
    pub fn reloading(mut self, running: &Config) -> Config {
        let mut hidden = self.own_files.clone();
        for f in &running.own_files {
            if !hidden.contains(f) {
                hidden.push(f.clone());
            }
        }
        for p in &mut self.plugins {
            p.sandbox.hidden = hidden.clone();
        }
        self.own_files = hidden;
        self
    }
}

/// The configuration file at `path`, parsed; the embedded default's
/// (empty) without one.
fn file_at(path: Option<&Path>) -> Result<FileRoboger, ConfigError> {
    match path {
        Some(p) => parse_file(p),
        None => Ok(FileRoboger::default()),
    }
}

fn parse_file(path: &Path) -> Result<FileRoboger, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_text(&text, path)
}

fn parse_text(text: &str, path: &Path) -> Result<FileRoboger, ConfigError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let root: FileRoot = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let message = in_the_files_words(&key, &e.into_inner().to_string());
        ConfigError::Parse {
            path: path.to_path_buf(),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            message,
        }
    })?;
    Ok(root.roboger)
}

/// Rust's names for what a key should hold, as whoever wrote the YAML
/// would say them.
const EXPECTED_WORDS: [(&str, &str); 12] = [
    ("i8", "a whole number"),
    ("i16", "a whole number"),
    ("i32", "a whole number"),
    ("i64", "a whole number"),
    ("isize", "a whole number"),
    ("u8", "a whole number, 0 or more"),
    ("u16", "a whole number, 0 or more"),
    ("u32", "a whole number, 0 or more"),
    ("u64", "a whole number, 0 or more"),
    ("usize", "a whole number, 0 or more"),
    ("f32", "a number"),
    ("f64", "a number"),
];

/// A YAML error's `message` in the file's terms: without the key, which
/// the YAML parser repeats and [`ConfigError::Parse`] already says, and
/// with "a mapping" or "a number" where serde names a Rust type
/// (`expected struct FileMaster`, `expected i32`).
fn in_the_files_words(key: &str, message: &str) -> String {
    let message = message
        .strip_prefix(key)
        .and_then(|m| m.strip_prefix(": "))
        .unwrap_or(message);
    let Some((before, after)) = message.split_once("expected ") else {
        return message.to_string();
    };
    let (word, rest) = after.split_once(' ').unwrap_or((after, ""));
    let (words, rest) = match word {
        // The struct's name follows.
        "struct" => ("a mapping", rest.split_once(' ').map_or("", |(_, r)| r)),
        _ => match EXPECTED_WORDS.iter().find(|(rust, _)| *rust == word) {
            Some((_, words)) => (*words, rest),
            None => return message.to_string(),
        },
    };
    let space = if rest.is_empty() { "" } else { " " };
    format!("{before}expected {words}{space}{rest}")
}

/// The longest value read from a file: a key or a URL.
const VALUE_FILE_MAX: u64 = 64 * 1024;

/// The file a value is read from: the original reads it from a file when
/// it starts with `/` or `./`.
fn value_file(v: &str) -> Option<&Path> {
    (v.starts_with('/') || v.starts_with("./")).then_some(Path::new(v))
}

/// The secrets read so far, and where they came from.
#[derive(Debug, Default)]
struct SecretsRead {
    /// The files their values were read from, which plugins may not read.
    files: Vec<PathBuf>,
    /// Those written in a file: the configuration, or a file a value named.
    written: Vec<Secret>,
}

impl SecretsRead {
    /// The value of the secret `key` (`what` in the log, `variable` in
    /// the environment), from the environment or else the configuration
    /// file at `config`, read from the file it names if it names one.
    /// Where it is written is recorded if `is_secret` holds of the value.
    fn read(
        &mut self,
        (key, what, variable): (&'static str, &'static str, &'static str),
        (from_env, from_config): (Option<String>, Option<String>),
        config: Option<&Path>,
        is_secret: impl Fn(&str) -> bool,
    ) -> Result<Option<String>, ConfigError> {
        let (v, written_in) = match (from_env, from_config) {
            (Some(v), _) => (v, None),
            (None, Some(v)) => (v, config),
            (None, None) => return Ok(None),
        };
        let file = value_file(&v).map(Path::to_path_buf);
        let written_in = file.as_deref().or(written_in).map(std::path::absolute);
        self.files.extend(file);
        let value = value_or_file(key, v)?;
        if let Some(Ok(file)) = written_in.filter(|_| is_secret(&value)) {
            self.written.push(Secret {
                what,
                variable,
                file,
            });
        }
        Ok(Some(value))
    }
}

/// A value, or the text of the file it names ([`value_file`]).
fn value_or_file(key: &str, v: String) -> Result<String, ConfigError> {
    use std::io::Read;
    if value_file(&v).is_some() {
        let cannot = |e: String| {
            invalid(
                key,
                format!(
                    "cannot read the value from file {v}: {e}{}",
                    sqlite_path_hint(key, &v)
                ),
            )
        };
        // A regular file: a FIFO or a device (/dev/stdin) could block
        // the start for ever.
        if !std::fs::metadata(&v)
            .map_err(|e| cannot(e.to_string()))?
            .is_file()
        {
            return Err(cannot("it is not a regular file".into()));
        }
        let mut bytes = Vec::new();
        std::fs::File::open(&v)
            .and_then(|f| f.take(VALUE_FILE_MAX + 1).read_to_end(&mut bytes))
            .map_err(|e| cannot(e.to_string()))?;
        if bytes.starts_with(SQLITE_HEADER) {
            return Err(cannot(
                "it is a SQLite database, not a file holding a value".into(),
            ));
        }
        if bytes.len() as u64 > VALUE_FILE_MAX {
            return Err(cannot(format!("it is longer than {VALUE_FILE_MAX} bytes")));
        }
        let text = String::from_utf8(bytes).map_err(|_| cannot("it is not UTF-8 text".into()))?;
        Ok(text.trim_end_matches(['\n', '\r']).to_string())
    } else {
        Ok(v)
    }
}

/// How every SQLite database file begins.
const SQLITE_HEADER: &[u8] = b"SQLite format 3\0";

/// What to write instead, when the value of `db` that names a file
/// holding the URL could not be read: such a value is most often the
/// path of a SQLite database, meant as one.
fn sqlite_path_hint(key: &str, v: &str) -> String {
    if key != "roboger.db" {
        return String::new();
    }
    format!(
        "; a value of db starting with / or ./ names a file holding the database URL: \
         for a SQLite database at {v}, write sqlite:///{v}"
    )
}

impl Config {
    /// The server's own files ([`Config::own_files`]), which no plugin may
    /// read (`sandbox`): its configuration file, the files its database URL and master key
    /// were read from, its data directory (the generated master key, the
    /// default SQLite database, the other plugins' directories) and its
    /// SQLite database with the journals beside it. Absolute, as a
    /// plugin runs in a directory of its own.
    fn own_files_of(
        config: Option<&Path>,
        secret_files: &[PathBuf],
        data_dir: &Path,
        db: &DbUrl,
    ) -> Vec<PathBuf> {
        let sqlite = db.sqlite_file().into_iter().flat_map(|f| {
            ["", "-wal", "-shm", "-journal"].map(|end| {
                let mut name = f.clone().into_os_string();
                name.push(end);
                PathBuf::from(name)
            })
        });
        config
            .into_iter()
            .map(Path::to_path_buf)
            .chain(secret_files.iter().cloned())
            .chain([data_dir.to_path_buf()])
            .chain(sqlite)
            .filter_map(|p| std::path::absolute(p).ok())
            .collect()
    }
}

/// Translates the original's SQLAlchemy-style URLs to the driver's form.
pub fn translate_db_url(raw: &str) -> Result<DbUrl, ConfigError> {
    const KEY: &str = "roboger.db";
    let (scheme, rest) = raw.split_once("://").ok_or_else(|| {
        // A bare path, meant as a SQLite database's.
        let hint = match raw.contains([':', '@']) || raw.trim().is_empty() {
            true => String::new(),
            false => format!(
                "; for a SQLite database at {raw} (from the working directory), write sqlite:///{raw}"
            ),
        };
        invalid(
            KEY,
            format!("not a database URL: {}{hint}", url_without_secrets(raw)),
        )
    })?;
    let base = scheme.split('+').next().unwrap_or(scheme);
    match base {
        "sqlite" => {
            // SQLAlchemy: sqlite:///relative.db, sqlite:////absolute.db;
            // sqlite:// (nothing) is an in-memory database.
            let path = rest.strip_prefix('/').unwrap_or(rest);
            let (path, _query) = path.split_once('?').unwrap_or((path, ""));
            if path.is_empty() || path == ":memory:" {
                return Ok(DbUrl {
                    url: "sqlite::memory:".into(),
                    backend: DbBackend::Sqlite,
                });
            }
            Ok(DbUrl {
                url: format!("sqlite://{path}?mode=rwc"),
                backend: DbBackend::Sqlite,
            })
        }
        "postgres" | "postgresql" => {
            let pghost = std::env::var("PGHOST").ok().filter(|h| !h.is_empty());
            let url = postgres_url(rest, pghost.as_deref()).map_err(|e| {
                invalid(
                    KEY,
                    format!("not a valid URL ({e}): {}", url_without_secrets(raw)),
                )
            })?;
            Ok(DbUrl {
                url,
                backend: DbBackend::Postgres,
            })
        }
        "mysql" | "mariadb" => {
            let url = mysql_url(rest).map_err(|e| {
                invalid(
                    KEY,
                    format!("not a valid URL ({e}): {}", url_without_secrets(raw)),
                )
            })?;
            let Some(url) = url else {
                return Err(invalid(
                    KEY,
                    format!(
                        "the URL names no host (or `unix_socket`): {}",
                        url_without_secrets(raw)
                    ),
                ));
            };
            Ok(DbUrl {
                url,
                backend: DbBackend::MySql,
            })
        }
        other => Err(invalid(
            KEY,
            format!("unsupported database {other:?}; use sqlite, postgresql or mysql URLs"),
        )),
    }
}

/// libpq's default directory of PostgreSQL's Unix socket on Debian.
const PG_SOCKET_DIR: &str = "/var/run/postgresql";

/// A PostgreSQL URL (`rest` after the scheme) in the driver's form. libpq,
/// and so the original, reads no host (`postgresql://user@/db`,
/// `postgresql:///db`) as `$PGHOST` (`pghost`), else the Unix socket in
/// [`PG_SOCKET_DIR`]: the URL for peer authentication as the service's
/// own user. The driver defaults neither that way, so such a URL gets a
/// `host` parameter (which the driver reads over the URL's host) unless
/// it has one.
fn postgres_url(rest: &str, pghost: Option<&str>) -> Result<String, url::ParseError> {
    let (mut url, had_host) = parse_server_url("postgres", rest)?;
    if had_host {
        return Ok(format!("postgres://{rest}"));
    }
    if !url.query_pairs().any(|(k, _)| k == "host") {
        url.query_pairs_mut()
            .append_pair("host", pghost.unwrap_or(PG_SOCKET_DIR));
    }
    Ok(url.to_string())
}

/// A MySQL URL (`rest` after the scheme) in the driver's form: the
/// original's PyMySQL names a Unix socket `unix_socket`
/// (`mysql+pymysql://user@/db?unix_socket=/run/mysqld/mysqld.sock`), the
/// driver `socket`. `None` when it names neither a host nor a socket.
fn mysql_url(rest: &str) -> Result<Option<String>, url::ParseError> {
    let (mut url, had_host) = parse_server_url("mysql", rest)?;
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| match k.as_ref() {
            "unix_socket" => ("socket".to_string(), v.into_owned()),
            _ => (k.into_owned(), v.into_owned()),
        })
        .collect();
    let socket = pairs.iter().any(|(k, _)| k == "socket");
    if !had_host && !socket {
        return Ok(None);
    }
    if !url.query().is_some_and(|q| q.contains("unix_socket=")) && had_host {
        return Ok(Some(format!("mysql://{rest}")));
    }
    url.query_pairs_mut().clear().extend_pairs(pairs);
    Ok(Some(url.to_string()))
}

/// A server database's URL (`rest` after `scheme://`) parsed, and whether
/// it names a host. One that does not (`user@/db`, `/db`), which the
/// `url` crate refuses with a user in it, gets `localhost` in its place:
/// the caller points the driver at the socket.
fn parse_server_url(scheme: &str, rest: &str) -> Result<(url::Url, bool), url::ParseError> {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((user, host)) => (format!("{user}@"), host),
        None => (String::new(), authority),
    };
    if !host.is_empty() && !host.starts_with(':') {
        return Ok((url::Url::parse(&format!("{scheme}://{rest}"))?, true));
    }
    let url = url::Url::parse(&format!("{scheme}://{userinfo}localhost{host}{tail}"))?;
    Ok((url, false))
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP `host:port`.
    Tcp(String),
    /// A Unix socket at this absolute path (`unix:PATH`, as gunicorn's
    /// `--bind` takes it), for a proxy on the same host.
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => f.write_str(a),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Checks a listen address (`host:port`, `host`, `:port`, an IP, or
/// `unix:PATH`) and returns it as `host:port` or an absolute socket path;
/// `key` names where it came from in errors.
pub fn normalize_listen(key: &str, v: &str) -> Result<Listen, ConfigError> {
    let v = v.trim();
    if let Some(rest) = v.strip_prefix("unix:") {
        // gunicorn takes `unix:PATH` and `unix://PATH` alike; a relative
        // path is relative to the directory the server starts in.
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() {
            return Err(invalid(key, "unix: names no socket path"));
        }
        let path = std::path::absolute(path)
            .map_err(|e| invalid(key, format!("cannot resolve {path:?}: {e}")))?;
        return Ok(Listen::Unix(path));
    }
    normalize_tcp_listen(key, v).map(Listen::Tcp)
}

fn normalize_tcp_listen(key: &str, v: &str) -> Result<String, ConfigError> {
    // `listen: 8080` (nginx's way) would be the host 0.0.0.8080, which
    // no interface has.
    if let Ok(port) = v.parse::<u16>() {
        return Err(invalid(
            key,
            format!(
                "{v} names only a port: write 127.0.0.1:{port} (this host only) or :{port} (every interface)"
            ),
        ));
    }
    if let Ok(sa) = v.parse::<std::net::SocketAddr>() {
        return Ok(sa.to_string());
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, DEFAULT_PORT).to_string());
    }
    let (host, port) = match v.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| invalid(key, format!("bad port in {v:?}")))?,
        ),
        None => (v, DEFAULT_PORT),
    };
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
    {
        return Err(invalid(key, format!("not a host:port address: {v:?}")));
    }
    Ok(format!("{host}:{port}"))
}

/// A plugin's `command` as its executable and arguments. A relative path
/// with a directory in it is taken from the directory the server starts
/// in (the plugin itself runs in its own); a bare name is looked up on
/// `PATH` when it runs.
fn plugin_command(key: &str, c: FileCommand) -> Result<(PathBuf, Vec<String>), ConfigError> {
    let (program, args) = match c {
        FileCommand::Path(p) => {
            // `command: node /opt/p/plugin.js`, a shell's way.
            let text = p.to_string_lossy();
            if text.contains(char::is_whitespace) && !p.exists() {
                let words: Vec<&str> = text.split_whitespace().collect();
                return Err(invalid(
                    key,
                    format!(
                        "no file {text:?}; to give the program arguments, write the command as a list: [{}]",
                        words.join(", ")
                    ),
                ));
            }
            (p, Vec::new())
        }
        FileCommand::Line(mut words) => {
            if words.is_empty() || words[0].is_empty() {
                return Err(invalid(key, "names no program"));
            }
            let program = PathBuf::from(words.remove(0));
            (program, words)
        }
    };
    let program = if program.is_relative() && program.components().count() > 1 {
        std::path::absolute(&program)
            .map_err(|e| invalid(key, format!("cannot resolve {}: {e}", program.display())))?
    } else {
        program
    };
    Ok((program, args))
}

fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Plugin names end up in paths (`/plugin/{name}`) and executable names.
pub fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// `limits.redis` (`host`, or `host:port`, and `db`) as a Redis URL.
fn redis_url(r: FileRedis) -> Result<String, ConfigError> {
    let host = r.host.unwrap_or_else(|| "localhost".to_string());
    let (name, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.starts_with('[') => (
            h.to_string(),
            p.parse::<u16>()
                .map_err(|_| invalid("roboger.limits.redis.host", format!("not a port: {p}")))?,
        ),
        _ => (host.clone(), 6379),
    };
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if !ok {
        return Err(invalid(
            "roboger.limits.redis.host",
            format!("not a host name or address: {host}"),
        ));
    }
    let url = format!("redis://{name}:{port}/{}", r.db.unwrap_or(0));
    redis::Client::open(url.as_str())
        .map_err(|e| invalid("roboger.limits.redis", e.to_string()))?;
    Ok(url)
}

/// The host name, for delivery leases.
fn default_node() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "roboger".to_string())
}

fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        // systemd's StateDirectory= may list several, separated by ':'.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return PathBuf::from(first);
        }
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("roboger");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".local/share/roboger");
    }
    PathBuf::from("roboger-data")
}

/// A list of networks (`10.0.0.0/8`) or addresses, each checked.
fn parse_nets(key: &str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            parse_net(s).ok_or_else(|| {
                invalid(
                    &format!("{key}[{i}]"),
                    format!("not a network or address: {s}"),
                )
            })
        })
        .collect()
}

/// Reads the stored master key, or generates a strong one and stores it
/// with mode 0600. Returns the key and whether it was generated now.
fn load_or_generate_key(dir: &Path) -> Result<(String, bool), ConfigError> {
    if let Some(key) = stored_key(dir)? {
        return Ok((key, false));
    }
    let path = dir.join(MASTER_KEY_FILE);
    let dd = |source| ConfigError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    create_private_dir(dir).map_err(dd)?;
    let key = crate::random::alphanumeric(48);
    write_private(&path, &key).map_err(dd)?;
    Ok((key, true))
}

/// The master key stored in data directory `dir`, if one is.
fn stored_key(dir: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(dir.join(MASTER_KEY_FILE)) {
        Ok(k) if !k.trim().is_empty() => Ok(Some(k.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::DataDir {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Creates the data directory readable by its owner only (an existing
/// one is left as it is).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, format!("{text}\n"))
}

/// Where the built-in plugins' executables are looked for: next to the
/// server binary (a build tree), then in `../lib/roboger` from it (the
/// package: `/usr/bin` and `/usr/lib/roboger`, or any other prefix).
pub fn plugin_dirs() -> Vec<PathBuf> {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    else {
        return Vec::new();
    };
    let lib = dir.join("../lib/roboger");
    vec![dir, lib]
}

/// The installed executable `file` (`roboger-plugin-NAME`), if one of
/// [`plugin_dirs`] has it.
pub fn installed_plugin(file: &str) -> Option<PathBuf> {
    plugin_dirs()
        .into_iter()
        .map(|d| d.join(file))
        .find(|p| p.is_file())
}

/// An `egress` setting with each entry checked as a CIDR or an address.
fn egress(key: &str, e: FileEgress) -> Result<Egress, ConfigError> {
    let list = |k: &str, v: Option<Vec<String>>| -> Result<Vec<String>, ConfigError> {
        let v = v.unwrap_or_default();
        let nets = parse_nets(&format!("{key}.{k}"), &v)?;
        Ok(nets.iter().map(ToString::to_string).collect())
    };
    Ok(Egress {
        deny: list("deny", e.deny)?,
        allow: list("allow", e.allow)?,
    })
}

/// A `sandbox` setting over `d` (the defaults, or the server-wide
/// setting for a plugin's own): each key given replaces the default's,
/// but `writable` adds to it.
fn sandbox(key: &str, d: &Sandbox, s: FileSandbox) -> Result<Sandbox, ConfigError> {
    let address_space = match s.address_space {
        None => d.address_space,
        Some(mib) if (16..=1 << 30).contains(&mib) => mib * 1024 * 1024,
        Some(_) => {
            return Err(invalid(
                &format!("{key}.address-space"),
                "must be a number of MiB from 16",
            ));
        }
    };
    let open_files = match s.open_files {
        None => d.open_files,
        Some(n) if n >= 16 => n,
        Some(_) => return Err(invalid(&format!("{key}.open-files"), "must be at least 16")),
    };
    if s.cpu_seconds == Some(0) {
        return Err(invalid(
            &format!("{key}.cpu-seconds"),
            "must be at least 1 (leave it out for no limit)",
        ));
    }
    let mut writable = d.writable.clone();
    writable.extend(s.writable.unwrap_or_default());
    if let Some(p) = writable.iter().find(|p| !p.is_absolute()) {
        return Err(invalid(
            &format!("{key}.writable"),
            format!("paths must be absolute: {}", p.display()),
        ));
    }
    if s.connect_ports.as_ref().is_some_and(|p| p.contains(&0)) {
        return Err(invalid(
            &format!("{key}.connect-ports"),
            "ports are 1 to 65535 (an empty list allows no TCP connection)",
        ));
    }
    Ok(Sandbox {
        address_space,
        open_files,
        cpu_seconds: s.cpu_seconds.or(d.cpu_seconds),
        writable,
        landlock: s.landlock.unwrap_or(d.landlock),
        connect_ports: s.connect_ports.or_else(|| d.connect_ports.clone()),
        data_dir: d.data_dir.clone(),
        hidden: d.hidden.clone(),
    })
}

fn builtin_plugins_next_to_binary() -> Vec<PluginConfig> {
    BUILTIN_PLUGINS
        .iter()
        .filter(|n| installed_plugin(&format!("roboger-plugin-{n}")).is_some())
        .map(|n| PluginConfig::named(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_known_by_the_file_they_are_written_in() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("roboger.yml");
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "from-a-file").unwrap();
        let env = |db: Option<&str>, key: Option<&str>| Overrides {
            db: db.map(str::to_string),
            master_key: key.map(str::to_string),
            data_dir: Some(dir.path().join("data")),
        };
        let with = |yaml: &str, env: &Overrides| {
            Config::from_text(yaml, &config, env)
                .unwrap()
                .secrets
                .into_iter()
                .map(|s| (s.what, s.variable, s.file))
                .collect::<Vec<_>>()
        };
        let inline = "roboger:\n  db: postgresql://u:pw@h/d\n  master:\n    key: inline\n";
        assert_eq!(
            with(inline, &env(None, None)),
            [
                ("the database URL's password", "ROBOGER_DB", config.clone()),
                ("the master key", "ROBOGER_MASTERKEY", config.clone()),
            ]
        );
        // Given in the environment instead: not written in a file.
        let given = env(Some("postgresql://u:pw@h/d"), Some("k"));
        assert_eq!(with(inline, &given), []);
        // A URL without a password holds no secret; a key file is one.
        let file_key = format!(
            "roboger:\n  db: postgresql://u@h/d\n  master:\n    key: {}\n",
            key_file.display()
        );
        assert_eq!(
            with(&file_key, &env(None, None)),
            [("the master key", "ROBOGER_MASTERKEY", key_file.clone())]
        );
        // The environment naming a file: that file.
        let named = env(None, Some(&key_file.display().to_string()));
        assert_eq!(
            with("roboger:\n  db: sqlite:///x.db\n", &named),
            [("the master key", "ROBOGER_MASTERKEY", key_file.clone())]
        );
    }

    fn load_str(yaml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("roboger.yml");
        std::fs::write(&p, yaml).unwrap();
        let env = Overrides {
            data_dir: Some(dir.path().join("data")),
            ..Default::default()
        };
        Config::load(Some(&p), &env)
    }

    #[test]
    fn a_wrong_type_is_said_once_in_the_files_words() {
        const KEY: &str = "roboger:\n  master:\n    key: k\n";
        for (yaml, said) in [
            (
                "roboger:\n  master: [k]\n".to_string(),
                "roboger.master: invalid type: sequence, expected a mapping at line 2 column 11",
            ),
            (
                format!("{KEY}  delivery:\n    max-attempts: x\n"),
                "roboger.delivery.max-attempts: invalid type: string \"x\", expected a whole number at line 5 column 19",
            ),
            (
                format!("{KEY}  timeout: soon\n"),
                "roboger.timeout: invalid type: string \"soon\", expected a number at line 4 column 12",
            ),
            (
                format!("{KEY}  push-max-media: 1x\n"),
                "roboger.push-max-media: invalid type: string \"1x\", expected a whole number, 0 or more at line 4 column 19",
            ),
            // What serde says in words already is left as it is.
            (
                format!("{KEY}  plugins: {{webhook: {{}}}}\n"),
                "roboger.plugins: invalid type: map, expected a sequence at line 4 column 12",
            ),
            (
                "robogerr: 1\n".to_string(),
                "robogerr: unknown field `robogerr`, expected `roboger`",
            ),
        ] {
            let e = load_str(&yaml).unwrap_err().to_string();
            assert!(e.ends_with(&format!(".yml: {said}")), "{yaml}: {e}");
        }
    }

    #[test]
    fn a_database_urls_password_is_never_said() {
        for (url, said) in [
            (
                "postgresql://roboger:pa:ss@db.example:notaport/r",
                "not a valid URL (invalid port number): postgresql://roboger:[secret]@db.example:notaport/r",
            ),
            (
                "postgresql://db.example:x/r?user=u&Password=pw&sslmode=require",
                "not a valid URL (invalid port number): postgresql://db.example:x/r?user=u&Password=[secret]&sslmode=require",
            ),
            (
                "roboger:pw@db.example/r",
                "not a database URL: roboger:[secret]@db.example/r",
            ),
            (
                "mysql://u:pw@/r",
                "the URL names no host (or `unix_socket`): mysql://u:[secret]@/r",
            ),
        ] {
            let e = translate_db_url(url).unwrap_err().to_string();
            assert!(e.ends_with(said), "{url}: {e}");
        }
    }

    #[test]
    fn python_plugins_name_a_module() {
        let c = load_str("roboger:\n  master:\n    key: x\n  plugins:\n    - name: foo\n      python: robogercontrib.foo\n")
            .unwrap();
        assert_eq!(c.plugins[0].python.as_deref(), Some("robogercontrib.foo"));
        assert!(crate::supervisor::executable(&c.plugins[0]).ends_with("roboger-plugin-python"));
        let e = load_str("roboger:\n  master:\n    key: x\n  plugins:\n    - name: foo\n      python: 'x; rm -rf /'\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("plugins[0].python"), "{e}");
    }

    #[test]
    fn connect_ports_are_replaced_by_a_plugins_own_and_checked() {
        let ports = |sandbox: &str, own: &str| {
            load_str(&format!(
                "roboger:\n  master:\n    key: x\n  sandbox: {sandbox}\n  plugins:\n    \
                 - {{name: a, command: /bin/true{own}}}\n    - {{name: b, command: /bin/true}}\n"
            ))
            .map(|c| {
                c.plugins
                    .iter()
                    .map(|p| p.sandbox.connect_ports.clone())
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string())
        };
        assert_eq!(ports("{}", "").unwrap(), [None, None]);
        assert_eq!(
            ports("{connect-ports: [443]}", ", sandbox: {connect-ports: []}").unwrap(),
            [Some(vec![]), Some(vec![443])]
        );
        let e = ports("{connect-ports: [0]}", "").unwrap_err();
        assert!(e.contains("roboger.sandbox.connect-ports"), "{e}");
        let e = ports("{}", ", sandbox: {connect-ports: [70000]}").unwrap_err();
        assert!(e.contains("connect-ports"), "{e}");
    }

    #[test]
    fn limits_redis_becomes_a_url_or_an_error_naming_the_key() {
        let redis = |r: &str| {
            load_str(&format!(
                "roboger:\n  master:\n    key: x\n  limits:\n    redis: {r}\n"
            ))
            .map(|c| c.limits.and_then(|l| l.redis))
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            redis("{host: localhost}").unwrap().as_deref(),
            Some("redis://localhost:6379/0")
        );
        assert_eq!(
            redis("{host: '10.0.0.5:7000', db: 2}").unwrap().as_deref(),
            Some("redis://10.0.0.5:7000/2")
        );
        assert_eq!(
            redis("{}").unwrap().as_deref(),
            Some("redis://localhost:6379/0")
        );
        let e = redis("{host: 'x:port'}").unwrap_err();
        assert!(
            e.contains("roboger.limits.redis.host") && e.contains("not a port"),
            "{e}"
        );
        let e = redis("{host: 'a b'}").unwrap_err();
        assert!(e.contains("roboger.limits.redis.host"), "{e}");
        let e = redis("{hots: localhost}").unwrap_err();
        assert!(e.contains("hots"), "{e}");
    }

    #[test]
    fn the_originals_example_config_loads() {
        let c = load_str(
            "roboger:\n  db: sqlite:////tmp/x/roboger.db\n  url: http://localhost:7719\n  \
             log-tracebacks: true\n  ip-header: X-Real-IP\n  secure-mode: false\n  \
             thread-pool-size: 20\n  db-pool-size: 2\n  timeout: 2\n  api-doc: false\n  \
             limits:\n    period: day\n    reserve: 10\n    redis:\n      host: localhost\n  \
             bucket:\n    default-expires: 60\n  \
             master:\n    key: secret\n    allow: ['127.0.0.0/8', '10.0.0.1']\n  \
             gunicorn:\n    listen: 0.0.0.0:7800\n    workers: 2\n  \
             plugins:\n    - name: webhook\n    - name: email\n      config:\n        smtp: {host: localhost}\n",
        )
        .unwrap();
        assert_eq!(c.db.url, "sqlite:///tmp/x/roboger.db?mode=rwc");
        assert_eq!(c.listen, Listen::Tcp("0.0.0.0:7800".into()));
        assert_eq!(c.master_key, "secret");
        assert_eq!(c.master_allow.len(), 2);
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.api_doc, None);
        assert_eq!(c.limits.as_ref().unwrap().reserve, 10);
        assert_eq!(c.bucket_default_expires, Duration::from_secs(60));
        assert_eq!(c.plugins.len(), 2);
        assert!(c.notices.iter().any(|n| n.contains("gunicorn.workers")));
    }

    /// A bucket object's default lifetime is from a second to ten years:
    /// past that, the time it would expire is not a time to store.
    #[test]
    fn bucket_default_expires_is_bounded() {
        let load = |v: &str| {
            load_str(&format!(
                "roboger:\n  master:\n    key: x\n  bucket:\n    default-expires: {v}\n"
            ))
        };
        for bad in ["0", "315360001", "18446744073709551615"] {
            let e = load(bad).unwrap_err().to_string();
            assert!(
                e.contains("roboger.bucket.default-expires")
                    && e.contains("must be between 1 and 315360000 seconds (ten years)"),
                "{bad}: {e}"
            );
        }
        let c = load("315360000").unwrap();
        assert_eq!(c.bucket_default_expires, crate::bucket::MAX_EXPIRES);
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = load_str("roboger:\n  master:\n    key: x\n  colour: red\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let e = load_str("roboger:\n  master:\n    key: x\n  timeout: soon\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("roboger.timeout"), "{e}");
        let e = load_str("roboger:\n  master:\n    key: x\n  url: 'not a url'\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("roboger.url"), "{e}");
        let e = load_str("roboger:\n  master:\n    key: x\n    allow: [nonsense]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("roboger.master.allow[0]"), "{e}");
        let e = load_str("roboger:\n  master:\n    key: x\n  ip-header-from: [127.0.0.1]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("roboger.ip-header-from") && e.contains("ip-header is not set"),
            "{e}"
        );
        let e = load_str(
            "roboger:\n  master:\n    key: x\n  ip-header: X-Real-IP\n  ip-header-from: [proxy]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("roboger.ip-header-from[0]"), "{e}");
        let c = load_str(
            "roboger:\n  master:\n    key: x\n  ip-header: X-Real-IP\n  \
             ip-header-from: [127.0.0.1, '10.0.0.0/8']\n",
        )
        .unwrap();
        assert_eq!(c.ip_header_from.len(), 2);
        let e = load_str("roboger:\n  master:\n    key: x\n  db: oracle://x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("roboger.db"), "{e}");
        let e = load_str(
            "roboger:\n  master:\n    key: x\n  plugins:\n    - name: webhook\n      confg: {}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("confg") && e.contains("plugins[0]"), "{e}");
    }

    #[test]
    fn sqlalchemy_urls_translate() {
        let t = |s| translate_db_url(s).unwrap().url;
        assert_eq!(
            t("sqlite:////var/lib/r.db"),
            "sqlite:///var/lib/r.db?mode=rwc"
        );
        assert_eq!(t("sqlite:///r.db"), "sqlite://r.db?mode=rwc");
        assert_eq!(t("postgresql://u:p@h/db"), "postgres://u:p@h/db");
        assert_eq!(
            t("postgresql+psycopg2://u:p@h:5433/db"),
            "postgres://u:p@h:5433/db"
        );
        assert_eq!(t("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(t("mysql+pymysql://u:p@h/db"), "mysql://u:p@h/db");
        // No host: $PGHOST, else Debian's socket directory, as libpq.
        let p = |s, pghost| postgres_url(s, pghost).unwrap();
        assert_eq!(
            p("roboger@/roboger", None),
            "postgres://roboger@localhost/roboger?host=%2Fvar%2Frun%2Fpostgresql"
        );
        assert_eq!(
            p("/db?sslmode=disable", Some("/run/pg")),
            "postgres://localhost/db?sslmode=disable&host=%2Frun%2Fpg"
        );
        assert_eq!(
            p("u:pw@:5433/db?host=/tmp", None),
            "postgres://u:pw@localhost:5433/db?host=/tmp"
        );
        assert_eq!(p("u@db.example/r", Some("/x")), "postgres://u@db.example/r");
        // MySQL: PyMySQL's `unix_socket` is the driver's `socket`.
        let m = |s| mysql_url(s).unwrap();
        assert_eq!(
            m("u:pw@/r?unix_socket=/run/mysqld/mysqld.sock").as_deref(),
            Some("mysql://u:pw@localhost/r?socket=%2Frun%2Fmysqld%2Fmysqld.sock")
        );
        assert_eq!(m("u@h:3307/r").as_deref(), Some("mysql://u@h:3307/r"));
        assert_eq!(m("u@/r?charset=utf8mb4"), None);
        assert!(translate_db_url("nonsense").is_err());
    }

    #[test]
    fn embedded_default_generates_the_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let env = Overrides {
            data_dir: Some(dir.path().join("d")),
            ..Default::default()
        };
        let a = Config::load(None, &env).unwrap();
        assert!(a.generated_key.is_some());
        assert!(a.master_key.len() >= 40);
        assert!(a.db.url.starts_with("sqlite://"));
        let b = Config::load(None, &env).unwrap();
        assert!(b.generated_key.is_none());
        assert_eq!(a.master_key, b.master_key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("d/master.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = std::fs::metadata(dir.path().join("d"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn env_overrides_and_file_values() {
        let dir = tempfile::tempdir().unwrap();
        let keyfile = dir.path().join("key");
        std::fs::write(&keyfile, "from-file\n").unwrap();
        let p = dir.path().join("r.yml");
        std::fs::write(
            &p,
            format!(
                "roboger:\n  db: sqlite:////nope.db\n  master:\n    key: {}\n",
                keyfile.display()
            ),
        )
        .unwrap();
        let env = Overrides {
            db: Some("postgresql://u@localhost/x".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&p), &env).unwrap();
        assert_eq!(c.master_key, "from-file");
        assert_eq!(c.db.backend, DbBackend::Postgres);
        let env = Overrides {
            master_key: Some("envkey".into()),
            ..Default::default()
        };
        assert_eq!(Config::load(Some(&p), &env).unwrap().master_key, "envkey");
    }

    #[test]
    fn listen_forms() {
        let tcp = |v: &str| normalize_listen("k", v).map(|l| l.to_string());
        assert_eq!(tcp("0.0.0.0").unwrap(), "0.0.0.0:7719");
        assert_eq!(tcp("localhost:80").unwrap(), "localhost:80");
        assert_eq!(tcp(":9000").unwrap(), "0.0.0.0:9000");
        assert!(tcp("h:x").is_err());
        let e = tcp("8080").unwrap_err().to_string();
        assert!(e.contains("write 127.0.0.1:8080"), "{e}");
        // gunicorn's forms of a Unix socket.
        for v in [
            "unix:/run/r/r.sock",
            "unix:///run/r/r.sock",
            " unix:/run/r/r.sock ",
        ] {
            assert_eq!(
                normalize_listen("k", v).unwrap(),
                Listen::Unix("/run/r/r.sock".into()),
                "{v}"
            );
        }
        let here = std::env::current_dir().unwrap();
        assert_eq!(
            normalize_listen("k", "unix:r.sock").unwrap(),
            Listen::Unix(here.join("r.sock"))
        );
        assert_eq!(
            normalize_listen("k", "unix://r.sock").unwrap(),
            Listen::Unix(here.join("r.sock"))
        );
        let e = normalize_listen("k", "unix:").unwrap_err().to_string();
        assert!(e.contains("names no socket path"), "{e}");
    }
}
