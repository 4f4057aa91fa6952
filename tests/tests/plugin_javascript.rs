//! A plugin in JavaScript (`tests/plugins/node_plugin.js`, Node's standard
//! library only), written the way an author would from
//! `schema/plugin-protocol.md` alone, through the real server: its
//! `command` as an interpreter and its script, or a relative path; its
//! config checks (answered as errors, `false` or a reason), `send` with callbacks, a `log` it sends as a
//! notification, the routes its manifest's `http` flag announces, and a
//! manifest it gets wrong.

use std::time::Duration;

use base64::Engine;
use roboger_tests::{Method, Server, ServerOptions, Value, assert_status, json, poll_until};

fn node_plugin() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/node_plugin.js")
}

/// A server running the plugin with `command`, which names it.
async fn server(command: &str, record: &std::path::Path, manifest: &str) -> Server {
    wired(command, record, manifest, "").await
}

/// As [`server`], the plugin making the wire mistake `wire` (if any),
/// with a call `timeout` of 2 s then and a ping every 0.3 s.
async fn wired(command: &str, record: &std::path::Path, manifest: &str, wire: &str) -> Server {
    let timeout = match wire {
        "" => "",
        _ => "\ntimeout: 2\nplugin-health-interval: 0.3",
    };
    Server::start_with(ServerOptions {
        yaml: format!("url: https://roboger.example.com{timeout}"),
        plugins_yaml: format!(
            "- name: node\n  command: {command}\n  config: {{greeting: hi}}\n  env:\n    TEST_PLUGIN_RECORD: {}\n    NODE_PLUGIN_MANIFEST: '{manifest}'\n    NODE_PLUGIN_WIRE: '{wire}'\n",
            record.display()
        ),
        ..Default::default()
    })
    .await
}

async fn plugin_state(s: &Server) -> Value {
    let list = s.manage(Method::GET, "/plugin", None).await.json();
    list.as_array()
        .and_then(|l| l.iter().find(|p| p["plugin_name"] == "node"))
        .cloned()
        .unwrap_or_else(|| panic!("no plugin node in {list}"))
}

/// The plugin's `last_error`, once it has one (10 s at most).
async fn last_error(s: &Server) -> String {
    poll_until(Duration::from_secs(10), async || {
        let p = plugin_state(s).await;
        match p["last_error"].as_str() {
            Some(why) => Ok(why.to_string()),
            None => Err(format!("no last_error yet: {p}")),
        }
    })
    .await
}

#[tokio::test]
async fn a_plugin_in_javascript_delivers_logs_and_serves_its_routes() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    // The interpreter and its script, as a list.
    let command = format!("[node, {}]", node_plugin().display());
    let s = server(&command, &record, "").await;
    let p = plugin_state(&s).await;
    assert_eq!(
        (&p["state"], &p["description"]),
        (&json!("running"), &json!("a plugin in JavaScript")),
        "{p}"
    );

    let (id, addr) = s.new_addr().await;
    let refused = s.try_endpoint(id, "node", json!({})).await;
    assert_status!(refused, 400);
    assert!(
        refused.text.contains("room is required"),
        "{}",
        refused.text
    );
    // A validator's false, or its reason as a text, refuses too.
    let closed = s.try_endpoint(id, "node", json!({"room": "closed"})).await;
    assert_status!(closed, 400);
    assert!(closed.text.contains("answered false"), "{}", closed.text);
    let full = s.try_endpoint(id, "node", json!({"room": "full"})).await;
    assert_status!(full, 400);
    assert!(full.text.contains("that room is full"), "{}", full.text);
    let ep = s.endpoint(id, "node", json!({"room": "r1"})).await;

    let media = b"GIF89a, a picture";
    let b64 = base64::engine::general_purpose::STANDARD.encode(media);
    let r = s
        .push(json!({"addr": addr, "msg": "door open", "level": "warning", "media": b64}))
        .await;
    assert_status!(r, 202);
    s.endpoint_settles(id, ep, 1, 0).await;
    let sent = roboger_tests::json_lines(&record);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let sent = &sent[0];
    assert_eq!(
        (&sent["msg"], &sent["level_name"], &sent["url"]),
        (
            &json!("door open"),
            &json!("WARNING"),
            &json!("https://roboger.example.com")
        )
    );
    // What it put in the bucket is served.
    let object = sent["object"].as_str().expect("a bucket object id");
    let file = s
        .request(Method::GET, &format!("/file/{object}"), None, &[], None)
        .await;
    assert_status!(file, 200);
    assert_eq!(file.text.as_bytes(), media);

    // Its `log`, sent without an id, is in the server's log, at its level.
    let event = sent["event_id"].as_str().unwrap_or_default();
    let said = format!("node sends {event} to r1");
    s.wait_log(&said, Duration::from_secs(10)).await;
    let line = s.log_lines(&said).join("\n");
    assert!(
        line.contains("WARN") && line.contains("plugin=node"),
        "{line}"
    );
    // One whose params are wrong (its level forgotten) cannot be answered
    // with an error: the log says why it was not carried out, and what it
    // said. Before, it was dropped without a word.
    let line = s.log_lines("loaded, greeting hi").join("\n");
    assert!(
        line.contains("WARN")
            && line.contains("plugin=node")
            && line
                .contains("notification not carried out (Invalid params: missing field `level`)"),
        "{line}"
    );
    // One of a method the server does not have is said to be dropped.
    let line = s.log_lines("a misspelt method").join("\n");
    assert!(
        line.contains("WARN")
            && line.contains("plugin=node")
            && line.contains("notification dropped: the server has no method logg"),
        "{line}"
    );

    // Routes: its manifest says `"http": true` (and no "http" in methods).
    let hello = s
        .request(Method::GET, "/plugin/node/hello", None, &[], None)
        .await;
    assert_status!(hello, 200);
    assert_eq!(hello.text, "hi from node, GET");
    assert_eq!(hello.header("content-type"), Some("text/plain"));
    // A body that is not base64 is a 502 that says so, in the log too.
    let plain = s
        .request(Method::GET, "/plugin/node/plain", None, &[], None)
        .await;
    assert_status!(plain, 502);
    assert!(
        plain.text.contains("a body that is not base64"),
        "{}",
        plain.text
    );
    s.wait_log("a body that is not base64", Duration::from_secs(5))
        .await;
}

#[tokio::test]
async fn a_plugin_whose_manifest_is_not_valid_is_refused_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    // A path relative to where the server starts (the plugin runs in its
    // own directory): cargo runs the suite in tests/.
    let relative = "plugins/node_plugin.js";
    assert!(std::path::Path::new(relative).exists());
    let s = server(relative, &dir.path().join("record.jsonl"), "broken").await;
    // Refused at once, not restarted: restarting cannot mend it.
    let p = plugin_state(&s).await;
    assert_eq!(p["state"], "refused", "{p}");
    let why = p["last_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("its manifest (the answer to hello) is not valid: missing field `name`"),
        "{why}"
    );
    assert!(!why.contains("column"), "{why}");
    assert_eq!(p["restarts"], 0, "{p}");

    // An error answered to `hello` is told as the plugin's words.
    let dir = tempfile::tempdir().unwrap();
    let s = server(relative, &dir.path().join("record.jsonl"), "error").await;
    let why = last_error(&s).await;
    assert!(
        why.contains("handshake failed: the plugin answered error -32002: not today"),
        "{why}"
    );
}

/// The wire mistakes of a hand-written plugin are told as what they are.
/// A message pretty-printed over several lines: before, "EOF while
/// parsing an object at line 1 column 1: {", and nothing about lines. An
/// answer whose id came back as a string: before, dropped without a word,
/// the caller waiting out its timeout for an answer the plugin had given.
#[tokio::test]
async fn a_plugins_wire_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let command = node_plugin().display().to_string();
    let s = wired(&command, &record, "", "pretty").await;
    let why = last_error(&s).await;
    assert!(
        why.contains("a message must be one whole JSON object on one line"),
        "{why}"
    );

    let s = wired(&command, &record, "", "string-ids").await;
    let (id, _) = s.new_addr().await;
    let r = s.try_endpoint(id, "node", json!({"room": "r"})).await;
    assert_status!(r, 503);
    assert!(r.text.contains("validate_config timed out"), "{}", r.text);
    let dropped = s.log_lines("answer dropped: its id \"");
    assert!(
        dropped.iter().any(|l| l.contains("plugin=node")
            && l.contains("an answer must repeat its request's id as it was sent")),
        "{dropped:?}"
    );

    // No `ping`: "method not found" is an answer, so the plugin is alive.
    // Before, each ping's error killed it ("health ping failed:
    // ErrorObject { code: MethodNotFound, … }"), until it was marked
    // failed.
    let s = wired(&command, &record, "", "no-ping").await;
    let said = "the plugin answers ping with error -32601: method not found; taken as alive";
    s.wait_log(said, Duration::from_secs(10)).await;
    let p = plugin_state(&s).await;
    assert_eq!(
        (&p["state"], &p["restarts"]),
        (&json!("running"), &json!(0)),
        "{p}"
    );
}
