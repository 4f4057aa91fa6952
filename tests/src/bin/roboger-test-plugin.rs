//! A plugin that misbehaves on demand, to drive the supervisor's tests
//! (the way nushell tests its plugin engine). Written with the SDK except
//! where the misbehaviour is below it.
//!
//! `TEST_PLUGIN_MODE` (environment): `normal` (default),
//! `exit-before-handshake`, `wrong-version`, `garbage`, `flood`,
//! `refuse-config`, `exit-in-load`, `stderr-flood` (a line of `TEST_PLUGIN_FLOOD` bytes
//! on stderr, after one that is not UTF-8), `chatty` (writes
//! `TEST_PLUGIN_FLOOD` lines, default 3000, `WARN chatty line N` on its
//! stderr at each start, then runs as `normal`), `linger` (stays 60 s after
//! its stdin closed, against the rule that a plugin then exits). `TEST_PLUGIN_RECORD`: a file
//! that gets one JSON line per call (method and every param received),
//! and one at start (the environment it was given, and any socket it
//! inherited).
//! `TEST_PLUGIN_START_DELAY_MS`: wait that long before the handshake.
//! `TEST_PLUGIN_CLEANUP_DELAY_MS`: take that long over each `cleanup`.
//!
//! An endpoint config steers `send`: `{"reject": "msg"}` is refused by
//! `validate_config`; `{"crash": true}` exits mid-call; `{"crash_on":
//! "text"}` exits (status 3) when the event's message is that text (a
//! poison event); `{"hang": true}`
//! never answers; `{"freeze": true}` stops the whole process (SIGSTOP);
//! `{"panic": "msg"}` panics with msg; `{"fail": "msg"}` fails; `{"later": s}` fails asking for a wait of s
//! seconds (as a rate-limited target does); `{"fail_times": n}` fails the
//! first n attempts of each event; `{"slow": ms}` answers after a while;
//! `{"gate": "/path"}` waits until that file exists (a target that is down
//! until the test brings it back); `TEST_PLUGIN_SEND_FAIL` (environment)
//! makes every `send` of this process fail with its text, after the rest;
//! `{"callbacks": true}` calls back into the server and records what it got;
//! `{"db_query": "SQL"}` runs that query through the server (the plugin
//! needs `db: true`), records how many rows came back and fails the
//! delivery with the server's error if it refused.
//! Against its sandbox: `{"write": "/path"}` writes a file there, and
//! `{"read": "/path"}` reads one (the error is the delivery's);
//! `{"signal": pid}` sends that process SIGCONT, which stops nothing;
//! `{"open_files": n}` opens `/dev/null` n times
//! at once; `{"allocate_mib": n}` touches n MiB, once per plugin
//! directory (a marker there makes its successor deliver instead);
//! `{"spin_s": n}` keeps a core busy for up to n s of wall time, once per
//! plugin directory likewise, and fails the call if nothing stopped it.
//! `{"bucket": {...}}` in a config has `validate_config` store a bucket
//! object (its `content` repeated `repeat` times).
//! Its HTTP route echoes each request as JSON, but `/page`, an HTML page
//! ([`PAGE`]) whose script sets its title.
//! A plugin config `{"requires": "/path"}` is refused while that file is
//! missing (a credentials file an operator has yet to put in place);
//! with `"missing": "exit"` the plugin exits instead, so it crashes at
//! each start until it is marked failed. `{"check_delay_ms": n}` in a
//! plugin config has its check take n ms.

use std::io::{BufRead, Write};

/// The page the route `/page` answers: titled "a plugin's page" until its
/// script runs.
const PAGE: &str = "<html><head><title>a plugin's page</title>\
    <script>document.title = 'its script ran'</script></head><body>a plugin's page</body></html>";

use base64::Engine;
use roboger_plugin_sdk::protocol::HostApiClient;
use roboger_plugin_sdk::{Event, Host, HttpRequest, HttpResponse, Info, Plugin, PluginError, run};
use serde_json::{Value, json};

fn record(v: Value) {
    if let Ok(path) = std::env::var("TEST_PLUGIN_RECORD")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        // One write per line, so concurrent calls never interleave.
        let _ = f.write_all(format!("{v}\n").as_bytes());
    }
}

struct Chaos {
    refuse_config: bool,
    exit_in_load: bool,
    http: bool,
    /// Failures so far per event, for `{"fail_times": n}`.
    failures: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

#[roboger_plugin_sdk::async_trait]
impl Plugin for Chaos {
    fn info(&self) -> Info {
        Info {
            name: "test",
            version: "9.9.9",
            description: "misbehaves on demand",
            url: Some("https://example.invalid/test-plugin"),
            http: self.http,
            config_schema: None,
            plugin_config_schema: None,
        }
    }

    async fn validate_plugin_config(
        &self,
        plugin_config: &Value,
        _host: &Host,
    ) -> Result<(), PluginError> {
        record(json!({"method": "validate_plugin_config", "plugin_config": plugin_config}));
        if self.refuse_config {
            return Err(PluginError::rejected(
                "this test plugin refuses every plugin config",
            ));
        }
        if let Some(ms) = plugin_config.get("check_delay_ms").and_then(Value::as_u64) {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        if let Some(path) = plugin_config.get("requires").and_then(Value::as_str)
            && !std::path::Path::new(path).exists()
        {
            let why = format!("the file {path} this plugin requires is missing");
            if plugin_config.get("missing").and_then(Value::as_str) == Some("exit") {
                eprintln!("ERROR {why}");
                std::process::exit(4);
            }
            return Err(PluginError::rejected(why));
        }
        Ok(())
    }

    async fn load(&self, plugin_config: &Value, _host: &Host) -> Result<(), PluginError> {
        record(
            json!({"method": "load", "plugin_config": plugin_config, "pid": std::process::id()}),
        );
        if self.exit_in_load {
            eprintln!("ERROR told to exit in load");
            std::process::exit(4);
        }
        tracing::info!("test plugin loaded with {plugin_config}");
        Ok(())
    }

    async fn validate_config(&self, config: &Value, host: &Host) -> Result<(), PluginError> {
        record(json!({"method": "validate_config", "config": config}));
        if config.get("freeze").is_some() {
            freeze();
        }
        if let Some(b) = config.get("bucket") {
            // `repeat` makes a large object from a short `content`.
            let content = b["content"]
                .as_str()
                .unwrap_or_default()
                .as_bytes()
                .repeat(b["repeat"].as_u64().map_or(1, |n| n as usize));
            let id = host
                .bucket_put(
                    &content,
                    b["addr_id"].as_i64(),
                    b["mimetype"].as_str(),
                    b["fname"].as_str(),
                    b["public"].as_bool().unwrap_or(false),
                    b.get("metadata").cloned(),
                    b["expires"].as_i64(),
                )
                .await?;
            record(json!({"method": "bucket_put", "id": id, "request": b}));
        }
        match config.get("reject") {
            Some(msg) => Err(PluginError::rejected(msg.as_str().unwrap_or("rejected"))),
            None => Ok(()),
        }
    }

    async fn http(&self, req: HttpRequest, _host: &Host) -> Result<HttpResponse, PluginError> {
        let asked = |key: &str| {
            req.query
                .split('&')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|s| s.parse::<usize>().ok())
        };
        let status = asked("status")
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(200);
        // `size=N` answers N bytes of "x" instead of the echo.
        let body = match asked("size") {
            Some(n) => "x".repeat(n),
            None => json!({
                "method": req.method, "path": req.path, "query": req.query,
                "headers": req.headers, "body": String::from_utf8_lossy(&req.body),
                "client_ip": req.client_ip,
            })
            .to_string(),
        };
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("x-test".to_string(), "yes".to_string());
        if req.path == "/page" {
            headers.insert("content-type".to_string(), "text/html".to_string());
            return Ok(HttpResponse {
                status,
                headers,
                body: base64::engine::general_purpose::STANDARD.encode(PAGE),
            });
        }
        headers.insert("content-type".to_string(), "application/json".to_string());
        Ok(HttpResponse {
            status,
            headers,
            body: base64::engine::general_purpose::STANDARD.encode(body),
        })
    }

    async fn cleanup(&self, _host: &Host) -> Result<(), PluginError> {
        record(json!({"method": "cleanup"}));
        if let Some(ms) = std::env::var("TEST_PLUGIN_CLEANUP_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        Ok(())
    }

    async fn send(&self, e: Event, host: &Host) -> Result<(), PluginError> {
        let c = &e.config;
        if c.get("crash_on").and_then(Value::as_str) == Some(e.msg.as_str()) {
            eprintln!("ERROR crashing on {}", e.msg);
            std::process::exit(3);
        }
        if c.get("gate").is_some() || c.get("slow").is_some() {
            // So a test knows this call is in flight.
            record(
                json!({"method": "send_started", "pid": std::process::id(), "event_id": e.event_id}),
            );
        }
        if c.get("crash").is_some() {
            std::process::exit(1);
        }
        if let Some(msg) = c.get("panic").and_then(Value::as_str) {
            panic!("{msg}");
        }
        if let Some(path) = c.get("write").and_then(Value::as_str) {
            std::fs::write(path, b"written by the test plugin")
                .map_err(|e| PluginError::failed(format!("write {path}: {e}")))?;
        }
        if let Some(path) = c.get("read").and_then(Value::as_str) {
            std::fs::read(path).map_err(|e| PluginError::failed(format!("read {path}: {e}")))?;
        }
        if let Some(pid) = c.get("signal").and_then(Value::as_i64) {
            let target = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
                .ok_or_else(|| PluginError::failed(format!("no such pid: {pid}")))?;
            rustix::process::kill_process(target, rustix::process::Signal::CONT).map_err(|e| {
                PluginError::failed(format!("signal {pid}: {}", std::io::Error::from(e)))
            })?;
        }
        if let Some(n) = c.get("open_files").and_then(Value::as_u64) {
            let mut open = Vec::new();
            for i in 0..n {
                let f = std::fs::File::open("/dev/null")
                    .map_err(|e| PluginError::failed(format!("open file {}: {e}", i + 1)))?;
                open.push(f);
            }
        }
        if let Some(mib) = c.get("allocate_mib").and_then(Value::as_u64) {
            let dir = std::env::var("ROBOGER_PLUGIN_DIR").unwrap_or_else(|_| ".".into());
            let marker = std::path::Path::new(&dir).join("allocated");
            if !marker.exists() {
                let _ = std::fs::write(&marker, b"");
                let size = usize::try_from(mib).unwrap_or(usize::MAX) * 1024 * 1024;
                let mut big = vec![0u8; size];
                for b in big.iter_mut().step_by(4096) {
                    *b = 1;
                }
                std::hint::black_box(&big);
            }
        }
        if let Some(secs) = c.get("spin_s").and_then(Value::as_u64) {
            let dir = std::env::var("ROBOGER_PLUGIN_DIR").unwrap_or_else(|_| ".".into());
            let marker = std::path::Path::new(&dir).join("spun");
            if !marker.exists() {
                let _ = std::fs::write(&marker, b"");
                let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
                let mut n = 0u64;
                while std::time::Instant::now() < end {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
                return Err(PluginError::failed(format!(
                    "spun {secs} s and nothing stopped it"
                )));
            }
        }
        if c.get("freeze").is_some() {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::STOP,
            );
        }
        if c.get("hang").is_some() {
            std::future::pending::<()>().await;
        }
        if let Some(ms) = c.get("slow").and_then(Value::as_u64) {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        if let Some(gate) = c.get("gate").and_then(Value::as_str) {
            while !std::path::Path::new(gate).exists() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        if let Some(sql) = c.get("db_query").and_then(Value::as_str) {
            let rows = host
                .client()
                .db_query(sql.to_string(), None)
                .await
                .map_err(|e| PluginError::failed(e.to_string()))?;
            record(json!({"method": "db_query", "rows": rows.len()}));
        }
        let mut callbacks = Value::Null;
        if c.get("callbacks").is_some() {
            callbacks = run_callbacks(host, &e).await.map_err(PluginError::failed)?;
        }
        record(json!({
            "method": "send",
            "pid": std::process::id(),
            "received_at": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default(),
            "config": e.config, "event_id": e.event_id, "addr": e.addr, "addr_id": e.addr_id,
            "msg": e.msg, "subject": e.subject, "formatted_subject": e.formatted_subject,
            "level": e.level, "level_name": e.level_name, "location": e.location, "tag": e.tag,
            "sender": e.sender, "media": e.media, "media_encoded": e.media_encoded,
            "media_fname": e.media_fname, "callbacks": callbacks,
        }));
        if let Some(n) = c.get("fail_times").and_then(Value::as_u64) {
            let mut f = self
                .failures
                .lock()
                .map_err(|_| PluginError::failed("lock"))?;
            let seen = f.entry(e.event_id.clone()).or_insert(0);
            if *seen < n {
                *seen += 1;
                return Err(PluginError::failed(format!(
                    "planned failure {seen} of {n}"
                )));
            }
        }
        if let Some(n) = c.get("log_bytes").and_then(Value::as_u64) {
            let text = "y".repeat(usize::try_from(n).unwrap_or(0));
            host.log("warning", &text).await?;
        }
        if let Some(msg) = c.get("fail") {
            return Err(PluginError::failed(msg.as_str().unwrap_or("failed")));
        }
        if let Some(s) = c.get("later").and_then(Value::as_f64) {
            let wait = std::time::Duration::try_from_secs_f64(s).unwrap_or_default();
            return Err(PluginError::Later(format!("asked to wait {s} s"), wait));
        }
        if let Ok(msg) = std::env::var("TEST_PLUGIN_SEND_FAIL") {
            return Err(PluginError::failed(msg));
        }
        Ok(())
    }
}

async fn run_callbacks(host: &Host, e: &Event) -> Result<Value, String> {
    let c = host.client();
    let s = |e: jsonrpsee_err::Error| e.to_string();
    c.log(
        json!("warning"),
        format!("callback log from event {}", e.event_id),
    )
    .await
    .map_err(s)?;
    let timeout = c.get_timeout().await.map_err(s)?;
    let level = c.convert_level(json!("crit")).await.map_err(s)?;
    let limits = c.is_use_limits().await.map_err(s)?;
    let url = c.get_url().await.map_err(s)?;
    let id = host
        .bucket_put(
            b"hello bucket",
            Some(e.addr_id),
            None,
            Some("hello.txt"),
            true,
            Some(json!({"k": "v"})),
            Some(60),
        )
        .await
        .map_err(|e| e.to_string())?;
    let obj = host.bucket_get(&id).await.map_err(|e| e.to_string())?;
    c.bucket_touch(id.clone()).await.map_err(s)?;
    let db = c.db_query("SELECT 1 AS one".into(), None).await.map_err(s);
    let other = host
        .call_plugin(
            "other",
            "validate_config",
            json!({"config": {"from": "test"}}),
        )
        .await
        .map_err(|e| e.to_string());
    Ok(json!({
        "timeout": timeout, "level": level, "limits": limits, "url": url,
        "bucket_id": id, "bucket_creator": obj.creator, "bucket_mimetype": obj.mimetype,
        "bucket_fname": obj.fname, "bucket_content": obj.content,
        "db": db.map_err(|e| e.to_string()).map(Value::from).unwrap_or_else(|e| json!({"error": e})),
        "call_plugin": other.unwrap_or_else(|e| json!({"error": e})),
    }))
}

mod jsonrpsee_err {
    pub use jsonrpsee::core::client::Error;
}

/// Stops the whole process, as a hung plugin would look. The stop is
/// repeated, so a stray SIGCONT (job control of whatever runs the tests)
/// cannot wake it for long, and the calling thread never returns.
fn freeze() {
    std::thread::spawn(|| {
        loop {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::STOP,
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    });
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Answers the handshake with an incompatible protocol version.
fn wrong_version() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines().map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v["method"] == "hello" {
            let answer = json!({"jsonrpc": "2.0", "id": v["id"], "result": {
                "protocol_version": "99.0", "name": "test", "methods": []}});
            let _ = writeln!(out, "{answer}");
            let _ = out.flush();
        }
    }
}

/// `TEST_PLUGIN_FLOOD`, the bytes a flood writes, or `default`.
fn flood_bytes(default: usize) -> usize {
    std::env::var("TEST_PLUGIN_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The descriptors above stderr that are sockets: a plugin is given its
/// three pipes and nothing of the server's (e.g. the socket systemd passed).
fn inherited_sockets() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return vec!["/proc/self/fd unreadable".into()];
    };
    dir.flatten()
        .filter_map(|e| {
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_string_lossy();
            (fd > 2 && target.starts_with("socket:")).then(|| format!("{fd} -> {target}"))
        })
        .collect()
}

fn main() -> std::process::ExitCode {
    // A plugin that takes its time to start (before the handshake).
    if let Some(ms) = std::env::var("TEST_PLUGIN_START_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let mode = std::env::var("TEST_PLUGIN_MODE").unwrap_or_default();
    record(
        json!({"method": "start", "mode": mode, "pid": std::process::id(),
        "env_masterkey": std::env::var("ROBOGER_MASTERKEY").ok(),
        "env_extra": std::env::var("TEST_PLUGIN_EXTRA").ok(),
        "env_listen_fds": std::env::var("LISTEN_FDS").ok(),
        "env_listen_pid": std::env::var("LISTEN_PID").ok(),
        "inherited_sockets": inherited_sockets()}),
    );
    match mode.as_str() {
        "exit-before-handshake" => {
            eprintln!("ERROR told to exit before the handshake");
            std::process::ExitCode::from(3)
        }
        "stderr-flood" => {
            // Bytes that are not UTF-8, then TEST_PLUGIN_FLOOD bytes in one
            // line, then an error line, before any handshake.
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(b"WARN caf\xe9 is not UTF-8\n");
            let chunk = vec![b'x'; 1 << 20];
            let mut left = flood_bytes(1 << 20);
            while left > 0 {
                let k = left.min(chunk.len());
                let _ = err.write_all(&chunk[..k]);
                left -= k;
            }
            let _ = err.write_all(b"\nERROR after the flood\n");
            std::process::ExitCode::from(3)
        }
        "wrong-version" => {
            wrong_version();
            std::process::ExitCode::SUCCESS
        }
        "garbage" | "flood" => {
            let mut out = std::io::stdout();
            if mode == "garbage" {
                let _ = writeln!(out, "this is not JSON");
            } else {
                let _ = out.write_all(&vec![b'x'; flood_bytes(2 << 20)]);
                let _ = writeln!(out);
            }
            let _ = out.flush();
            // Wait for the server to close stdin.
            for _ in std::io::stdin().lock().lines() {}
            std::process::ExitCode::SUCCESS
        }
        _ => {
            if mode == "chatty" {
                let mut err = std::io::stderr().lock();
                for i in 0..flood_bytes(3000) {
                    let _ = writeln!(err, "WARN chatty line {i}");
                }
            }
            let code = run(Chaos {
                refuse_config: mode == "refuse-config",
                exit_in_load: mode == "exit-in-load",
                http: std::env::var_os("TEST_PLUGIN_NO_HTTP").is_none(),
                failures: Default::default(),
            });
            if mode == "linger" {
                std::thread::sleep(std::time::Duration::from_secs(60));
            }
            code
        }
    }
}
