//! Wire types shared by the server and plugins: the protocol version, the
//! handshake manifest, and each direction's methods as jsonrpsee
//! `#[rpc(server, client)]` traits with named (kwargs-style) params.
//!
//! Framing: one JSON-RPC 2.0 message per line (UTF-8) on the plugin's
//! stdin (server -> plugin) and stdout (plugin -> server); the plugin's
//! stderr is its log. Requests flow both ways at once, each direction with
//! its own ids. Receivers ignore params they do not know, so either side
//! can add params later without breaking the other.
//!
//! Invariant: this module is the only place that defines how a value is
//! spelled on the wire; the server and plugins both import it from here.

// Each kwarg of a method is a Rust parameter; `send` has as many as the
// original's kwargs.
#![allow(clippy::too_many_arguments)]

use std::collections::BTreeMap;

use jsonrpsee::core::RpcResult;
use jsonrpsee::proc_macros::rpc;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this crate speaks (semver: a different major
/// version is incompatible).
pub const PROTOCOL_VERSION: &str = "1.0";

/// Whether a peer speaking `theirs` can talk to us.
pub fn compatible(theirs: &str) -> bool {
    let major = |v: &str| v.split('.').next().map(str::to_string);
    major(theirs).is_some() && major(theirs) == major(PROTOCOL_VERSION)
}

/// The `/push` header saying how many Roboger servers forwarded the
/// event before (the chain plugin sends the event's [`SendParams::hops`]
/// plus one). A server refuses a push that has passed through too many,
/// which ends a loop of chain endpoints forwarding to each other.
pub const HOPS_HEADER: &str = "x-roboger-hops";

/// Every method of [`PluginApi`] (server to plugin), as named on the wire.
pub const PLUGIN_METHODS: [&str; 9] = [
    "hello",
    "validate_plugin_config",
    "load",
    "validate_config",
    "send",
    "send_batch",
    "cleanup",
    "http",
    "ping",
];

/// Every method of [`HostApi`] (plugin to server), as named on the wire.
pub const HOST_METHODS: [&str; 14] = [
    "log",
    "get_timeout",
    "get_url",
    "convert_level",
    "is_use_limits",
    "is_use_lastrowid",
    "bucket_put",
    "bucket_get",
    "bucket_touch",
    "bucket_delete",
    "call_plugin",
    "db_query",
    "db_execute",
    "db_insert",
];

/// Optional plugin methods; a plugin lists in its manifest those it has.
pub const OPTIONAL_METHODS: [&str; 6] = [
    "validate_plugin_config",
    "load",
    "validate_config",
    "send_batch",
    "cleanup",
    "http",
];

/// One event for one endpoint: `send`'s params, and each member of
/// `send_batch`'s `events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendParams {
    pub config: Value,
    pub event_id: String,
    pub addr: String,
    pub addr_id: i64,
    pub msg: String,
    pub subject: String,
    pub formatted_subject: String,
    pub level: u8,
    pub level_name: String,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub sender: Option<String>,
    #[serde(default)]
    pub media_encoded: Option<String>,
    #[serde(default)]
    pub media_fname: Option<String>,
    /// How many Roboger servers forwarded the event before this one
    /// took it (the chain plugin's [`HOPS_HEADER`]); absent for 0.
    #[serde(default)]
    pub hops: Option<u16>,
}

/// [`SendParams`] as the server writes them: borrowed from the event and
/// endpoint it already holds, so a delivery clones none of their strings
/// on its way to the pipe. The two must spell the same object (a test
/// reads one as the other).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SendArgs<'a> {
    pub config: &'a Value,
    pub event_id: &'a str,
    pub addr: &'a str,
    pub addr_id: i64,
    pub msg: &'a str,
    pub subject: &'a str,
    pub formatted_subject: &'a str,
    pub level: u8,
    pub level_name: &'a str,
    pub location: Option<&'a str>,
    pub tag: Option<&'a str>,
    pub sender: Option<&'a str>,
    pub media_encoded: Option<&'a str>,
    pub media_fname: Option<&'a str>,
    /// Left out when 0, as it is for every event pushed directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hops: Option<u16>,
}

/// What `send_batch` answers for one of its events, in the events' order:
/// `{}` when it was delivered, else the error `send` would have answered.
/// (The server reads each member on its own and also takes `null` and
/// `true` as delivered, and an `error` that is only a text as a failure,
/// as plugins in other languages write them.)
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SendOutcome {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<OutcomeError>,
}

/// A failed event of a `send_batch`: a JSON-RPC error object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutcomeError {
    pub code: i32,
    pub message: String,
    /// As a JSON-RPC error's `data`: see [`retry_after`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// The key of a [`codes::FAILED`] error's `data` object that says how
/// long the target asked the sender to wait before trying again (seconds,
/// a number), as an HTTP target's `Retry-After` does: `{"retry_after": 30}`.
/// The server's next try of that delivery is no sooner (within its
/// `delivery.retry-max`).
pub const RETRY_AFTER: &str = "retry_after";

/// The longest wait [`retry_after`] reads; a longer one is this.
pub const RETRY_AFTER_MAX: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The wait a failed call's error `data` asks for ([`RETRY_AFTER`]),
/// when it is a positive number, or a text of one (an HTTP header's value
/// passed on as it came, `"30"`); anything else in `data` is no wait,
/// since plugins in any language may put their own things there.
pub fn retry_after(data: Option<&Value>) -> Option<std::time::Duration> {
    let secs = match data?.get(RETRY_AFTER)? {
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        v => v.as_f64()?,
    };
    (secs.is_finite() && secs > 0.0)
        .then(|| std::time::Duration::from_secs_f64(secs.min(RETRY_AFTER_MAX.as_secs_f64())))
}

/// The error `data` asking for a wait of `wait` ([`RETRY_AFTER`]).
pub fn retry_after_data(wait: std::time::Duration) -> Value {
    serde_json::json!({ RETRY_AFTER: wait.as_secs_f64() })
}

/// Which addresses a plugin may connect to, as CIDRs (or single
/// addresses), sent in `hello`. Besides these, link-local, metadata,
/// unspecified and multicast addresses are refused unless allowed; an
/// allowed network wins over a denied one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub allow: Vec<String>,
}

/// A plugin's answer to `hello`: who it is and what it implements.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The protocol version the plugin speaks.
    pub protocol_version: String,
    /// The plugin's own name (informational; the server's config names it).
    pub name: String,
    /// The plugin's version.
    #[serde(default)]
    pub version: Option<String>,
    /// One line saying what it does.
    #[serde(default)]
    pub description: Option<String>,
    /// Where to read more.
    #[serde(default)]
    pub url: Option<String>,
    /// Which of [`OPTIONAL_METHODS`] it implements (`send` is required).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Whether it serves HTTP routes under `/plugin/{name}/`.
    #[serde(default)]
    pub http: bool,
    /// The JSON Schema of its endpoint config, if it has one: the server's
    /// console builds the endpoint form from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_schema: Option<serde_json::Value>,
    /// The JSON Schema of its plugin config, if it has one. In both
    /// schemas a `writeOnly` field is a secret: the server keeps its value
    /// out of logs and error texts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_config_schema: Option<serde_json::Value>,
}

impl Manifest {
    /// Whether the plugin has optional `method`: listed in `methods`, or
    /// for `http` also said by the `http` flag (a plugin may say it either
    /// way; the protocol's example shows the flag).
    pub fn offers(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method) || (method == "http" && self.http)
    }
}

/// A plugin's answer to an `http` call (by default an empty 200).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// HTTP status (default 200).
    #[serde(default = "default_status")]
    pub status: u16,
    /// Response headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The body, base64-encoded.
    #[serde(default)]
    pub body: String,
}

fn default_status() -> u16 {
    200
}

impl Default for HttpResponse {
    fn default() -> Self {
        HttpResponse {
            status: default_status(),
            headers: BTreeMap::new(),
            body: String::new(),
        }
    }
}

/// A bucket object as `bucket_get` returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BucketObject {
    pub id: String,
    pub creator: String,
    pub addr_id: Option<i64>,
    pub mimetype: String,
    pub fname: Option<String>,
    pub size: i64,
    pub public: bool,
    pub metadata: Value,
    /// Creation time, RFC 3339.
    pub d: String,
    /// Last access time, RFC 3339.
    pub da: Option<String>,
    /// Lifetime in seconds from creation.
    pub expires: i64,
    /// The content, base64-encoded.
    pub content: String,
}

/// Methods the server calls on a plugin (sent on the plugin's stdin).
#[rpc(server, client)]
pub trait PluginApi {
    /// The handshake, always first: the server's versions in, the
    /// plugin's [`Manifest`] out.
    /// `egress` is the plugin's egress policy (absent from older servers).
    #[method(name = "hello", param_kind = map)]
    async fn hello(
        &self,
        server_version: String,
        protocol_version: String,
        egress: Option<Egress>,
    ) -> RpcResult<Manifest>;

    /// Checks the plugin's global configuration (before `load`).
    #[method(name = "validate_plugin_config", param_kind = map)]
    async fn validate_plugin_config(&self, plugin_config: Value) -> RpcResult<()>;

    /// Initialises the plugin with its global configuration.
    #[method(name = "load", param_kind = map)]
    async fn load(&self, plugin_config: Value) -> RpcResult<()>;

    /// Checks an endpoint's configuration; an error is the user's 400.
    #[method(name = "validate_config", param_kind = map)]
    async fn validate_config(&self, config: Value) -> RpcResult<()>;

    /// Delivers one event to one endpoint. Media travels once, base64
    /// (`media_encoded`); SDKs hand plugins the decoded bytes too.
    #[method(name = "send", param_kind = map)]
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
    ) -> RpcResult<()>;

    /// Delivers several events (each to its own endpoint) in one call;
    /// optional, offered in the manifest, and the server sends a batch
    /// only to a plugin that offers it. Each event's outcome is its own:
    /// the answer has one [`SendOutcome`] per event, in order, before the
    /// server's timeout (which the whole call has), a send that has not
    /// ended by then answered as failed. Events with media are always
    /// sent one by one, with `send`.
    #[method(name = "send_batch", param_kind = map)]
    async fn send_batch(&self, events: Vec<SendParams>) -> RpcResult<Vec<SendOutcome>>;

    /// Removes the plugin's expired files and records.
    #[method(name = "cleanup", param_kind = map)]
    async fn cleanup(&self) -> RpcResult<()>;

    /// Serves a request to `/plugin/{name}/{path}`; `body` is base64.
    #[method(name = "http", param_kind = map)]
    async fn http(
        &self,
        method: String,
        path: String,
        query: String,
        headers: BTreeMap<String, String>,
        body: String,
        client_ip: Option<String>,
    ) -> RpcResult<HttpResponse>;

    /// Health check; answers as soon as the plugin's loop is alive.
    #[method(name = "ping", param_kind = map)]
    async fn ping(&self) -> RpcResult<()>;
}

/// The notification the server sends before closing a plugin's stdin.
pub const SHUTDOWN_NOTIFICATION: &str = "shutdown";

/// Methods a plugin calls on the server (sent on the plugin's stdout).
#[rpc(server, client)]
pub trait HostApi {
    /// Writes `message` to the server's log at `level` (a level name or
    /// number, converted like `convert_level`), tagged with the plugin.
    #[method(name = "log", param_kind = map)]
    async fn log(&self, level: Value, message: String) -> RpcResult<()>;

    /// The server's default timeout, in seconds.
    #[method(name = "get_timeout", param_kind = map)]
    async fn get_timeout(&self) -> RpcResult<f64>;

    /// The server's public base URL (`url` in its config), if set; a
    /// plugin that registers webhooks elsewhere (Telegram) needs it.
    #[method(name = "get_url", param_kind = map)]
    async fn get_url(&self) -> RpcResult<Option<String>>;

    /// The original's `convert_level`.
    #[method(name = "convert_level", param_kind = map)]
    async fn convert_level(&self, level: Value) -> RpcResult<u8>;

    /// Whether address limits are configured.
    #[method(name = "is_use_limits", param_kind = map)]
    async fn is_use_limits(&self) -> RpcResult<bool>;

    /// Whether `db_execute` must use `lastrowid` (the database has no RETURNING).
    #[method(name = "is_use_lastrowid", param_kind = map)]
    async fn is_use_lastrowid(&self) -> RpcResult<bool>;

    /// Stores an immutable object; returns its id. `content` is base64;
    /// the creator is always `plugin.NAME`. `expires` is seconds, from 1
    /// to ten years (315360000); without it, `bucket.default-expires`.
    /// On MySQL, an object that would outlive 2038-01-19 03:14:07 UTC is
    /// refused.
    #[method(name = "bucket_put", param_kind = map)]
    async fn bucket_put(
        &self,
        content: String,
        addr_id: Option<i64>,
        mimetype: Option<String>,
        fname: Option<String>,
        public: Option<bool>,
        metadata: Option<Value>,
        expires: Option<i64>,
    ) -> RpcResult<String>;

    /// An unexpired object (filtered by `public` when given).
    #[method(name = "bucket_get", param_kind = map)]
    async fn bucket_get(&self, object_id: String, public: Option<bool>) -> RpcResult<BucketObject>;

    /// Sets an object's access time.
    #[method(name = "bucket_touch", param_kind = map)]
    async fn bucket_touch(&self, object_id: String) -> RpcResult<()>;

    /// Deletes an object.
    #[method(name = "bucket_delete", param_kind = map)]
    async fn bucket_delete(&self, object_id: String) -> RpcResult<()>;

    /// Calls `method` of another plugin with named `params`.
    #[method(name = "call_plugin", param_kind = map)]
    async fn call_plugin(
        &self,
        plugin_name: String,
        method: String,
        params: Option<Value>,
    ) -> RpcResult<Value>;

    /// Runs a query with named `:params` (plugins with `db: true` only);
    /// returns rows as objects.
    #[method(name = "db_query", param_kind = map)]
    async fn db_query(
        &self,
        sql: String,
        params: Option<serde_json::Map<String, Value>>,
    ) -> RpcResult<Vec<Value>>;

    /// Runs a statement with named `:params` (plugins with `db: true`
    /// only); returns the number of rows affected.
    #[method(name = "db_execute", param_kind = map)]
    async fn db_execute(
        &self,
        sql: String,
        params: Option<serde_json::Map<String, Value>>,
    ) -> RpcResult<u64>;

    /// [`db_execute`](Self::db_execute), answering also the id of the row
    /// the statement inserted: what SQLAlchemy's `lastrowid` gives, for
    /// databases without `RETURNING` ([`is_use_lastrowid`](Self::is_use_lastrowid)).
    #[method(name = "db_insert", param_kind = map)]
    async fn db_insert(
        &self,
        sql: String,
        params: Option<serde_json::Map<String, Value>>,
    ) -> RpcResult<DbInserted>;
}

/// What `db_insert` answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbInserted {
    /// The rows the statement changed, as `db_execute` answers.
    pub rows_affected: u64,
    /// The id of the row it inserted (MySQL's `LAST_INSERT_ID()`,
    /// SQLite's rowid); `null` when it inserted none, and on PostgreSQL,
    /// which has `RETURNING` (`db_query`) for that.
    pub last_insert_id: Option<i64>,
}

/// JSON-RPC error codes of this protocol (beyond JSON-RPC's own).
pub mod codes {
    /// The plugin refused the input (config invalid and the like).
    pub const REJECTED: i32 = -32001;
    /// The plugin failed while doing the work (a delivery error).
    pub const FAILED: i32 = -32002;
    /// The caller may not do this (e.g. database access not granted).
    pub const FORBIDDEN: i32 = -32003;
    /// The thing asked for does not exist (bucket object, plugin).
    pub const NOT_FOUND: i32 = -32004;
    /// Too many calls in flight; try again.
    pub const BUSY: i32 = -32005;
}

/// An event level, as numbered by the original Roboger (Python logging
/// levels): DEBUG 10, INFO 20, WARNING 30, ERROR 40, CRITICAL 50.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(into = "u8", try_from = "u8")]
pub enum Level {
    /// 10
    Debug = 10,
    /// 20, the default when nothing (or nothing recognisable) is given.
    #[default]
    Info = 20,
    /// 30; levels from here up may use the limits' reserve.
    Warning = 30,
    /// 40
    Error = 40,
    /// 50
    Critical = 50,
}

impl Level {
    /// All levels, lowest first.
    pub const ALL: [Level; 5] = [
        Level::Debug,
        Level::Info,
        Level::Warning,
        Level::Error,
        Level::Critical,
    ];

    /// The numeric code (10..=50).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The level for an exact numeric code, if it is one of the five.
    pub fn from_code(code: i64) -> Option<Level> {
        Level::ALL.into_iter().find(|l| i64::from(l.code()) == code)
    }

    /// The upper-case name the original sends as `level_name`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warning => "WARNING",
            Level::Error => "ERROR",
            Level::Critical => "CRITICAL",
        }
    }

    /// The original's `convert_level` for a string: a numeric string in the
    /// set is that level; otherwise the first letter (d, i, w, e, c, any
    /// case) decides; anything else is INFO.
    pub fn convert_str(s: &str) -> Level {
        let t = s.trim();
        if let Ok(n) = t.parse::<i64>() {
            return Level::from_code(n).unwrap_or(Level::Info);
        }
        match t.chars().next().map(|c| c.to_ascii_lowercase()) {
            Some('d') => Level::Debug,
            Some('i') => Level::Info,
            Some('w') => Level::Warning,
            Some('e') => Level::Error,
            Some('c') => Level::Critical,
            _ => Level::Info,
        }
    }

    /// The original's `convert_level` for any JSON value: integers (and
    /// integral floats) in the set, strings as [`Level::convert_str`],
    /// everything else INFO.
    pub fn convert(v: &serde_json::Value) -> Level {
        match v {
            serde_json::Value::Number(n) => {
                let code = n
                    .as_i64()
                    .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64));
                code.and_then(Level::from_code).unwrap_or(Level::Info)
            }
            serde_json::Value::String(s) => Level::convert_str(s),
            _ => Level::Info,
        }
    }
}

impl From<Level> for u8 {
    fn from(l: Level) -> u8 {
        l.code()
    }
}

impl TryFrom<u8> for Level {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        Level::from_code(i64::from(v)).ok_or_else(|| format!("invalid level code {v}"))
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_wait_is_read_as_a_number_or_a_text_of_one() {
        let wait =
            |v: Value| retry_after(Some(&json!({ RETRY_AFTER: v }))).map(|d| d.as_secs_f64());
        assert_eq!(wait(json!(30)), Some(30.0));
        assert_eq!(wait(json!(" 2.5 ")), Some(2.5));
        assert_eq!(wait(json!(1e9)), Some(86_400.0));
        for none in [
            json!("soon"),
            json!("-1"),
            json!("inf"),
            json!(0),
            json!(null),
        ] {
            assert_eq!(wait(none.clone()), None, "{none}");
        }
        assert_eq!(retry_after(Some(&json!("30"))), None);
    }

    #[test]
    fn convert_level_matches_the_original() {
        assert_eq!(Level::convert(&json!(30)), Level::Warning);
        assert_eq!(Level::convert(&json!("40")), Level::Error);
        assert_eq!(Level::convert(&json!(30.0)), Level::Warning);
        assert_eq!(Level::convert(&json!(31)), Level::Info);
        assert_eq!(Level::convert(&json!("Warn")), Level::Warning);
        assert_eq!(Level::convert(&json!("CRIT")), Level::Critical);
        assert_eq!(Level::convert(&json!("debug")), Level::Debug);
        assert_eq!(Level::convert(&json!("e")), Level::Error);
        assert_eq!(Level::convert(&json!("x")), Level::Info);
        assert_eq!(Level::convert(&json!("")), Level::Info);
        assert_eq!(Level::convert(&json!(null)), Level::Info);
        assert_eq!(Level::convert(&json!([1])), Level::Info);
    }

    #[test]
    fn send_args_are_read_as_send_params() {
        let config = json!({"url": "http://x/"});
        let args = SendArgs {
            config: &config,
            event_id: "e1",
            addr: "A",
            addr_id: 7,
            msg: "disk \"full\"",
            subject: "disk",
            formatted_subject: "WARNING: disk",
            level: 30,
            level_name: "WARNING",
            location: Some("lab"),
            tag: None,
            sender: Some("bot"),
            media_encoded: Some("aGk="),
            media_fname: None,
            hops: Some(2),
        };
        let read: SendParams =
            serde_json::from_str(&serde_json::to_string(&args).unwrap()).unwrap();
        assert_eq!(
            read,
            SendParams {
                config,
                event_id: "e1".into(),
                addr: "A".into(),
                addr_id: 7,
                msg: "disk \"full\"".into(),
                subject: "disk".into(),
                formatted_subject: "WARNING: disk".into(),
                level: 30,
                level_name: "WARNING".into(),
                location: Some("lab".into()),
                tag: None,
                sender: Some("bot".into()),
                media_encoded: Some("aGk=".into()),
                media_fname: None,
                hops: Some(2),
            }
        );
    }

    #[test]
    fn the_published_schema_lists_every_method() {
        let text = include_str!("../../schema/plugin-protocol.schema.json");
        let schema: serde_json::Value = serde_json::from_str(text).unwrap();
        let names = |def: &str| -> Vec<String> {
            let mut v: Vec<String> = schema["$defs"][def]["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            v.sort();
            v
        };
        let sorted = |a: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(names("PluginMethods"), sorted(&PLUGIN_METHODS));
        assert_eq!(names("HostMethods"), sorted(&HOST_METHODS));
    }

    #[test]
    fn levels_serialize_as_numbers() {
        assert_eq!(serde_json::to_string(&Level::Error).unwrap(), "40");
        assert_eq!(serde_json::from_str::<Level>("10").unwrap(), Level::Debug);
        assert!(serde_json::from_str::<Level>("11").is_err());
    }
}
