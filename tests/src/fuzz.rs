//! The bodies of the fuzz targets (`tests/fuzz`, run with `cargo fuzz`
//! on nightly) and of the corpus replay (`tests/fuzz_corpus.rs`, on stable
//! in CI): every parser that takes bytes from outside the server, each fed
//! arbitrary bytes and checked for what must hold of its answer, not only
//! for not crashing.
//!
//! [`TARGETS`] names them; [`run`] runs one on one input.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use roboger_plugin_sdk::protocol::{self, HttpResponse, Manifest};
use roboger_plugin_sdk::rpc::{NotificationHandler, Peer, PeerOptions};
use roboger_server::api::body::Body;
use roboger_server::api::error::ApiError;
use roboger_server::config::{Config, Overrides};
use roboger_server::event::Event;
use roboger_server::level::{Level, LevelMatch};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// A fuzz target's body: one input, panicking on what must not happen.
pub type Target = fn(&[u8]);

/// Every fuzz target, by the name of its `tests/fuzz/fuzz_targets/` file
/// and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("push", push),
    ("config", config),
    ("rpc_lines", rpc_lines),
    ("plugin_messages", plugin_messages),
    ("manage_body", manage_body),
    ("level", level),
    ("chat_code", chat_code),
    ("bucket_object", bucket_object),
];

/// Runs target `name` on `data`; panics on an unknown name.
pub fn run(name: &str, data: &[u8]) {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => f(data),
        None => panic!("no fuzz target {name}"),
    }
}

/// Splits `data` at its first NUL byte (the rest is empty without one).
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// A push (`/push`): the first byte picks the Content-Type, the query
/// string runs to the first NUL, the body is the rest. Either an event
/// with an address and a known level, or a 400 naming a field or the body.
pub fn push(data: &[u8]) {
    let Some((kind, rest)) = data.split_first() else {
        return;
    };
    let ctype = match kind % 5 {
        0 => None,
        1 => Some("application/json"),
        2 => Some("application/x-www-form-urlencoded"),
        3 => Some("multipart/form-data; boundary=X"),
        _ => Some("text/plain"),
    };
    let (query, body) = split(rest);
    let query = String::from_utf8_lossy(query);
    let body = bytes::Bytes::copy_from_slice(body);
    // A body held whole is parsed without waiting for anything.
    let parsed = roboger_server::api::push::fields(&query, ctype, body)
        .now_or_never()
        .expect("parsing a push's fields never waits");
    let why = match parsed {
        Err(ApiError::BadRequest(why)) => why,
        Err(e) => panic!("a push's fields failed with other than 400: {e:?}"),
        Ok(fields) => match Event::from_fields(fields) {
            Ok(e) => {
                assert!(!e.addr.is_empty());
                assert!(Level::from_code(i64::from(e.level.code())).is_some());
                for t in [&e.addr, &e.msg, &e.subject, &e.formatted_subject] {
                    assert!(!t.contains('\0'), "a NUL reached an event: {e:?}");
                }
                return;
            }
            Err(bad) => bad.0,
        },
    };
    assert!(
        why.starts_with("field \"")
            || why.starts_with("unknown field \"")
            || why.starts_with("the request body"),
        "a 400 that names no field: {why}"
    );
}

/// `roboger.yml` as text: it loads or is refused with an error naming a
/// key or the file, and never reads a device or more than a value's worth
/// of a file (values starting with `/` name files).
pub fn config(data: &[u8]) {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    let text = String::from_utf8_lossy(data);
    let env = Overrides {
        master_key: Some("fuzz".into()),
        data_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let path = dir.path().join("roboger.yml");
    if let Err(e) = Config::from_text(&text, &path, &env) {
        assert!(!e.to_string().is_empty());
    }
}

/// The plugin pipe as both sides read it (the SDK's `Peer`, which the
/// server and every Rust plugin use): arbitrary bytes arrive while one of
/// our calls waits for its answer. The peer answers what it can, closes
/// on garbage or at the end, and the waiting call always ends.
pub fn rpc_lines(data: &[u8]) {
    runtime().block_on(async {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let (read, write) = tokio::io::split(ours);
        let noop: NotificationHandler = Arc::new(|_, _| {});
        let opts = PeerOptions {
            max_line: 4096,
            call_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let peer = Peer::start(
            read,
            write,
            opts,
            |_| {
                let mut m = jsonrpsee::RpcModule::new(());
                let _ = m.register_method("echo", |p, _, _| p.parse::<Value>());
                m.into()
            },
            noop,
        );
        let (mut their_read, mut their_write) = tokio::io::split(theirs);
        // Their side: drain what we write, send the input, then hang up.
        let drain =
            tokio::spawn(
                async move { tokio::io::copy(&mut their_read, &mut tokio::io::sink()).await },
            );
        let client = peer.client().clone();
        let call = tokio::spawn(async move {
            use jsonrpsee::core::client::ClientT;
            client
                .request::<Value, _>("ping", jsonrpsee::rpc_params![])
                .await
        });
        let _ = their_write.write_all(data).await;
        let _ = their_write.shutdown().await;
        drop(their_write);
        let closed = tokio::time::timeout(Duration::from_secs(5), peer.closed()).await;
        assert!(
            closed.is_ok(),
            "the peer did not close after the input ended"
        );
        let ended = tokio::time::timeout(Duration::from_secs(5), call).await;
        assert!(ended.is_ok(), "a call outlived its closed peer");
        drop(peer);
        drain.abort();

        // The same bytes to a plugin written with the SDK: its real
        // methods (hello, send, ...) decode what arrives; it stops when
        // the input ends.
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let (read, write) = tokio::io::split(ours);
        let plugin = tokio::spawn(roboger_plugin_sdk::serve(Silent, read, write));
        let (mut their_read, mut their_write) = tokio::io::split(theirs);
        let drain =
            tokio::spawn(
                async move { tokio::io::copy(&mut their_read, &mut tokio::io::sink()).await },
            );
        let _ = their_write.write_all(data).await;
        let _ = their_write.shutdown().await;
        drop(their_write);
        let ended = tokio::time::timeout(Duration::from_secs(5), plugin).await;
        assert!(
            ended.is_ok(),
            "the plugin did not stop after the input ended"
        );
        drain.abort();
    });
}

/// A plugin that delivers every event by doing nothing.
struct Silent;

#[roboger_plugin_sdk::async_trait]
impl roboger_plugin_sdk::Plugin for Silent {
    fn info(&self) -> roboger_plugin_sdk::Info {
        roboger_plugin_sdk::Info::default()
    }

    async fn send(
        &self,
        _event: roboger_plugin_sdk::Event,
        _host: &roboger_plugin_sdk::Host,
    ) -> Result<(), roboger_plugin_sdk::PluginError> {
        Ok(())
    }
}

/// What the server decodes from a plugin besides the pipe's framing: the
/// `hello` manifest and its version check, an `http` route's answer, and
/// a `db_query`'s SQL with named parameters; and what a plugin decodes
/// from the server (an event to send).
pub fn plugin_messages(data: &[u8]) {
    let (sql, json) = split(data);
    if let Ok(m) = serde_json::from_slice::<Manifest>(json) {
        let _ = protocol::compatible(&m.protocol_version);
    }
    if let Ok(v) = serde_json::from_slice::<Value>(json) {
        match roboger_server::api::public::route_answer("fuzz", v.clone()) {
            Ok(a) => {
                let status = a.status.as_u16();
                assert!((200..600).contains(&status), "a route answered {status}");
                assert!(!a.headers.contains_key(http::header::CONTENT_LENGTH));
            }
            Err(bad) => assert!(bad.to_string().starts_with("plugin fuzz answered ")),
        }
        if let Ok(h) = serde_json::from_value::<HttpResponse>(v.clone()) {
            let _ = h.status;
        }
    }
    let sql = String::from_utf8_lossy(sql);
    for dollar in [true, false] {
        let (out, names) = roboger_server::store::named::positional(&sql, dollar);
        assert!(names.iter().all(|n| !n.is_empty()));
        if !dollar {
            // Each name became one `?` outside quotes: never more names
            // than question marks in the result.
            assert!(
                out.matches('?').count() >= names.len(),
                "{sql:?} -> {out:?}"
            );
        }
    }
}

/// A management request body: parsed, then every field read with the
/// accessor a handler would use. Each refusal is a 400 or 405 whose text
/// names a field or the body.
pub fn manage_body(data: &[u8]) {
    let body = match Body::parse(data) {
        Ok(b) => b,
        Err(ApiError::BadRequest(why)) => {
            assert!(why.starts_with("the request body") || why.starts_with("field \""));
            return;
        }
        Err(e) => panic!("parsing a body failed with other than 400: {e:?}"),
    };
    let fields = [
        "active",
        "lim_c",
        "location",
        "level",
        "level_match",
        "cmd",
        "target",
        "config",
    ];
    let results = [
        body.only(&fields, &["id", "a"]).err(),
        body.active("active").err(),
        body.count("lim_c").err(),
        body.nullable_text("location").err(),
        body.level("level").err(),
        body.level_match("level_match").err(),
        body.required_str("cmd").err(),
        body.id("target").err(),
        body.object("config").err(),
        body.flag("replace").err(),
    ];
    for e in results.into_iter().flatten() {
        match e {
            ApiError::BadRequest(why) | ApiError::MethodNotAllowed(why) => assert!(
                why.starts_with("field \"")
                    || why.starts_with("unknown field \"")
                    || why.starts_with("Field \""),
                "{why}"
            ),
            e => panic!("a field check failed with other than 400/405: {e:?}"),
        }
    }
    if let Ok(Some(n)) = body.count("lim_c") {
        assert!(n >= 0);
    }
}

/// Levels as senders write them (any JSON number or string) and level
/// rules: a level always converts to one of the five, and a rule's
/// canonical spelling parses back to it.
pub fn level(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let values = [
        Value::String(text.to_string()),
        serde_json::from_slice::<Value>(data).unwrap_or(Value::Null),
    ];
    for v in values {
        let l = Level::convert(&v);
        assert_eq!(Level::from_code(i64::from(l.code())), Some(l));
    }
    if let Some(m) = LevelMatch::parse(&text) {
        assert_eq!(LevelMatch::parse(m.as_str()), Some(m));
    }
}

/// Telegram chat codes: any text decrypts to nothing or to the id it was
/// made from, and every id's code decrypts back to it.
pub fn chat_code(data: &[u8]) {
    static CODES: OnceLock<roboger_plugin_telegram::chat_code::ChatCodes> = OnceLock::new();
    let codes = CODES.get_or_init(|| roboger_plugin_telegram::chat_code::ChatCodes::new("1:fuzz"));
    let text = String::from_utf8_lossy(data);
    if let Some(id) = codes.decrypt(&text) {
        // This plugin's codes are made again alike (no padding); the
        // original's (standard base64 of 64 or 80 bytes, so always
        // padded) carry a random IV.
        if !text.trim().ends_with('=') {
            assert_eq!(codes.encrypt(id).ok().as_deref(), Some(text.trim()));
        }
    }
    let mut raw = [0u8; 8];
    for (i, b) in data.iter().take(8).enumerate() {
        raw[i] = *b;
    }
    let id = i64::from_le_bytes(raw);
    let code = codes.encrypt(id).expect("encrypt");
    assert_eq!(codes.decrypt(&code), Some(id));
}

/// Bucket objects: ids as clients and plugins give them, and content
/// types detected from arbitrary bytes.
pub fn bucket_object(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if roboger_server::bucket::is_object_id(&text) {
        assert_eq!(text.len(), 64);
    }
    let id = roboger_server::bucket::object_id(data, "fuzz", Some(1), chrono::Utc::now());
    assert!(roboger_server::bucket::is_object_id(&id), "{id}");
    let mime = roboger_server::bucket::detect_mimetype(data);
    assert!(http::HeaderValue::from_str(&mime).is_ok(), "{mime:?}");
}

/// One runtime for every input (building one per input would dominate).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}
