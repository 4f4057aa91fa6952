//! Calls to real plugin processes through the server's supervisor, driven
//! in-process (the event pipeline that calls `send` for pushes builds on
//! this): every kwarg arrives, callbacks work both ways while sends are in
//! flight, and a plugin killed mid-call fails those calls promptly and
//! serves again after its restart. Both the Rust test plugin and a
//! stdlib-only Python plugin are driven the same way; the JavaScript
//! plugin answers a batch in its own language's words.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use roboger_server::config::{PluginConfig, translate_db_url};
use roboger_server::host::HostContext;
use roboger_server::store::Store;
use roboger_server::supervisor::{CallError, Options, RawParams, State, Supervisor};
use roboger_tests::{Value, fresh_database, json, plugin_calls, poll_until, test_plugin_bin};
use serde_json::Map;
use serde_json::value::RawValue;

struct Rig {
    sup: Arc<Supervisor>,
    store: Store,
    _dir: tempfile::TempDir,
}

async fn rig(dir: tempfile::TempDir, plugins: Vec<PluginConfig>) -> Rig {
    let url = translate_db_url(&fresh_database(dir.path())).unwrap();
    let store = Store::connect(&url, 4, Duration::from_secs(5))
        .await
        .unwrap();
    store.migrate(Duration::from_secs(5)).await.unwrap();
    let host = HostContext::new(
        store.clone(),
        Duration::from_secs(2),
        false,
        Duration::from_secs(86_400),
        Some("https://roboger.example.com".into()),
    );
    let mut opts = Options::new(Duration::from_secs(2), 1 << 20);
    opts.health_interval = Duration::from_millis(500);
    let sup = Supervisor::start(plugins, opts, host);
    sup.wait_started().await;
    Rig {
        sup,
        store,
        _dir: dir,
    }
}

fn test_plugin(name: &str, record: &Path) -> PluginConfig {
    let mut p = PluginConfig::named(name);
    p.command = Some(test_plugin_bin());
    p.env
        .insert("TEST_PLUGIN_RECORD".into(), record.display().to_string());
    p
}

fn python_plugin(name: &str, record: &Path) -> PluginConfig {
    let mut p = PluginConfig::named(name);
    p.command = Some(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/plugins/stdlib_plugin.py"
    )));
    p.env
        .insert("TEST_PLUGIN_RECORD".into(), record.display().to_string());
    p
}

const MEDIA: &[u8] = &[0, 1, 2, 255, b'x'];

fn send_params(event_id: &str, addr_id: i64, config: Value) -> Map<String, Value> {
    let media = base64::engine::general_purpose::STANDARD.encode(MEDIA);
    let v = json!({
        "config": config, "event_id": event_id, "addr": "A".repeat(64), "addr_id": addr_id,
        "msg": "disk \"full\"\nreally", "subject": "disk", "formatted_subject": "WARNING bot@lab: disk",
        "level": 30, "level_name": "WARNING", "location": "lab", "tag": "storage", "sender": "bot@lab",
        "media": media.clone(), "media_encoded": media, "media_fname": "x.bin",
        "a_param_from_the_future": {"ignored": true},
    });
    v.as_object().unwrap().clone()
}

/// [`send_params`] written once as JSON, as the pipeline hands them over.
fn raw_params(event_id: &str, addr_id: i64, config: Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(&send_params(event_id, addr_id, config)).expect("JSON")
}

async fn every_kwarg_arrives(plugin: fn(&str, &Path) -> PluginConfig) {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let r = rig(dir, vec![plugin("p", &rec)]).await;
    let addr = r.store.addr_create().await.unwrap();
    r.sup
        .call("p", "send", send_params("ev-1", addr.id, json!({"k": "v"})))
        .await
        .unwrap();
    let got = plugin_calls(&rec, "send");
    assert_eq!(got.len(), 1);
    let g = &got[0];
    let expect = json!({
        "config": {"k": "v"}, "event_id": "ev-1", "addr": "A".repeat(64), "addr_id": addr.id,
        "msg": "disk \"full\"\nreally", "subject": "disk", "formatted_subject": "WARNING bot@lab: disk",
        "level": 30, "level_name": "WARNING", "location": "lab", "tag": "storage", "sender": "bot@lab",
        "media_fname": "x.bin",
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&g[k], v, "kwarg {k}");
    }
    assert_eq!(g["media"], json!(MEDIA), "media arrives as bytes");
    assert_eq!(
        g["media_encoded"],
        base64::engine::general_purpose::STANDARD.encode(MEDIA)
    );
    r.sup.shutdown().await;
}

#[tokio::test]
async fn rust_plugin_receives_every_kwarg() {
    every_kwarg_arrives(test_plugin).await;
}

#[tokio::test]
async fn python_plugin_receives_every_kwarg() {
    every_kwarg_arrives(python_plugin).await;
}

async fn callbacks_while_sends_are_in_flight(plugin: fn(&str, &Path) -> PluginConfig) {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let other_rec = dir.path().join("other.jsonl");
    let mut granted = plugin("dbok", &dir.path().join("dbok.jsonl"));
    granted.db = true;
    let r = rig(
        dir,
        vec![plugin("p", &rec), test_plugin("other", &other_rec), granted],
    )
    .await;
    let addr = r.store.addr_create().await.unwrap();
    let mut calls = Vec::new();
    for i in 0..40 {
        let sup = r.sup.clone();
        let params = send_params(
            &format!("ev-{i}"),
            addr.id,
            json!({"callbacks": true, "slow": 20}),
        );
        calls.push(tokio::spawn(
            async move { sup.call("p", "send", params).await },
        ));
    }
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let got = plugin_calls(&rec, "send");
    assert_eq!(got.len(), 40);
    for g in &got {
        let cb = &g["callbacks"];
        assert_eq!(cb["timeout"], 2.0, "{cb}");
        assert_eq!(cb["level"], 50);
        assert_eq!(cb["limits"], false);
        assert_eq!(cb["url"], "https://roboger.example.com");
        assert_eq!(
            cb["bucket_creator"], "plugin.p",
            "the creator is the calling plugin"
        );
        assert_eq!(cb["bucket_mimetype"], "text/plain");
        assert_eq!(cb["bucket_fname"], "hello.txt");
        assert_eq!(
            cb["bucket_content"],
            base64::engine::general_purpose::STANDARD.encode(b"hello bucket")
        );
        assert_eq!(cb["bucket_id"].as_str().unwrap().len(), 64);
        assert!(
            cb["db"]["error"].as_str().unwrap().contains("not granted"),
            "{cb}"
        );
        assert_eq!(cb["call_plugin"], Value::Null, "{cb}");
    }
    assert_eq!(
        plugin_calls(&other_rec, "validate_config").len(),
        40,
        "call_plugin reached the other plugin"
    );
    // A plugin granted database access can query.
    r.sup
        .call(
            "dbok",
            "send",
            send_params("ev-db", addr.id, json!({"callbacks": true})),
        )
        .await
        .unwrap();
    let dbrec = plugin_calls(&r._dir.path().join("dbok.jsonl"), "send");
    assert_eq!(dbrec[0]["callbacks"]["db"], json!([{"one": 1}]));
    r.sup.shutdown().await;
}

#[tokio::test]
async fn rust_plugin_calls_back_while_sends_are_in_flight() {
    callbacks_while_sends_are_in_flight(test_plugin).await;
}

#[tokio::test]
async fn python_plugin_calls_back_while_sends_are_in_flight() {
    callbacks_while_sends_are_in_flight(python_plugin).await;
}

async fn wait_running(sup: &Supervisor, name: &str, not_pid: Option<u32>) -> u32 {
    poll_until(Duration::from_secs(15), async || {
        let st = sup
            .list()
            .into_iter()
            .find(|s| s.plugin_name == name)
            .unwrap();
        st.pid
            .filter(|p| st.state == State::Running && Some(*p) != not_pid)
            .ok_or_else(|| format!("{name} never ran again: {st:?}"))
    })
    .await
}

async fn killed_mid_call(plugin: fn(&str, &Path) -> PluginConfig) {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let r = rig(dir, vec![plugin("p", &rec)]).await;
    let pid = wait_running(&r.sup, "p", None).await;
    let mut calls = Vec::new();
    for i in 0..5 {
        let sup = r.sup.clone();
        let params = send_params(&format!("slow-{i}"), 1, json!({"slow": 1500}));
        calls.push(tokio::spawn(
            async move { sup.call("p", "send", params).await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    for c in calls {
        // Ended by itself, as far as the server can tell (its hand did
        // not stop it), and no call was made alone: none is the cause.
        let e = c.await.unwrap().unwrap_err();
        assert!(
            matches!(&e, CallError::Ended { why, cause: false, .. } if why.contains("SIGKILL")),
            "{e:?}"
        );
    }
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "calls failed after {:?}",
        killed.elapsed()
    );
    let new = wait_running(&r.sup, "p", Some(pid)).await;
    assert_ne!(new, pid);
    r.sup
        .call("p", "send", send_params("after", 1, json!({})))
        .await
        .unwrap();
    assert_eq!(
        plugin_calls(&rec, "send").last().unwrap()["event_id"],
        "after"
    );
    r.sup.shutdown().await;
}

/// `send_alone`: a send made with nothing else in flight on its plugin,
/// for a delivery that was in flight when the plugin ended. It waits for
/// the calls in flight; a plugin the server stops under it (a restart)
/// does not make it the cause; a plugin that ends during it is blamed on
/// it only once the plugin has delivered since it started.
#[tokio::test]
async fn a_send_made_alone_is_alone_and_blamed_only_when_it_can_be() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let gate = dir.path().join("gate");
    let r = rig(dir, vec![test_plugin("p", &rec)]).await;
    let raw = |id: &str, config: Value| RawParams(raw_params(id, 1, config));
    let msg = send_params("x", 1, json!({}))["msg"].clone();
    let poison = json!({ "crash_on": msg });

    // Alone: it waits for the gated send in flight to end.
    let sup = r.sup.clone();
    let config = json!({ "gate": gate });
    let gated = tokio::spawn(async move {
        let params = send_params("gated", 1, config);
        sup.call("p", "send", params).await
    });
    poll_until(Duration::from_secs(10), async || {
        match plugin_calls(&rec, "send_started").len() {
            1 => Ok(()),
            n => Err(format!("{n} sends started")),
        }
    })
    .await;
    let sup = r.sup.clone();
    let alone = raw("alone", json!({}));
    let mut alone = tokio::spawn(async move { sup.send_alone("p", alone).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut alone)
            .await
            .is_err(),
        "the send made alone did not wait for the one in flight"
    );
    std::fs::write(&gate, b"").unwrap();
    gated.await.unwrap().expect("the gated send");
    alone.await.unwrap().expect("the send made alone");
    let sent: Vec<Value> = plugin_calls(&rec, "send")
        .iter()
        .map(|v| v["event_id"].clone())
        .collect();
    assert_eq!(sent, [json!("gated"), json!("alone")]);

    // A restart by hand waits for the send in flight: it is made.
    let pid = wait_running(&r.sup, "p", None).await;
    let sup = r.sup.clone();
    let slow = raw("slow", json!({"slow": 1000}));
    let slow = tokio::spawn(async move { sup.send_alone("p", slow).await });
    roboger_tests::sends_begun(&rec, 2).await;
    r.sup.restart("p").unwrap();
    slow.await
        .unwrap()
        .expect("the send in flight at a restart by hand");

    // Ending the plugin before it delivered anything: not the cause.
    let pid = wait_running(&r.sup, "p", Some(pid)).await;
    let e = r.sup.send_alone("p", raw("p1", poison.clone())).await;
    assert!(
        matches!(&e, Err(CallError::Ended { cause: false, .. })),
        "{e:?}"
    );
    // Ending it after it delivered another: the cause, saying how.
    wait_running(&r.sup, "p", Some(pid)).await;
    r.sup
        .call("p", "send", send_params("fine", 1, json!({})))
        .await
        .unwrap();
    let e = r.sup.send_alone("p", raw("p2", poison)).await;
    assert!(
        matches!(&e, Err(CallError::Ended { cause: true, why, .. }) if why.contains("exit status: 3")),
        "{e:?}"
    );

    // The server stopping it under a send (its shutdown, which does not
    // wait: the pipeline has stopped first) is the server's doing: no
    // cause.
    wait_running(&r.sup, "p", Some(pid)).await;
    let sup = r.sup.clone();
    let slow = raw("slow", json!({"slow": 5000}));
    let slow = tokio::spawn(async move { sup.send_alone("p", slow).await });
    roboger_tests::sends_begun(&rec, 3).await;
    r.sup.shutdown().await;
    let e = slow.await.unwrap().unwrap_err();
    assert!(matches!(e, CallError::Unavailable(..)), "{e:?}");
}

#[tokio::test]
async fn rust_plugin_killed_mid_call_serves_again() {
    killed_mid_call(test_plugin).await;
}

#[tokio::test]
async fn python_plugin_killed_mid_call_serves_again() {
    killed_mid_call(python_plugin).await;
}

#[tokio::test]
async fn a_hung_call_times_out_and_failures_carry_the_plugins_message() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let r = rig(dir, vec![test_plugin("p", &rec)]).await;
    let t = Instant::now();
    let e = r
        .sup
        .call("p", "send", send_params("hang", 1, json!({"hang": true})))
        .await
        .unwrap_err();
    // The SDK drops the send just under the server's timeout (2 s here)
    // and answers it as failed; the server's own timeout is the backstop
    // for a plugin that answers nothing at all (tests/plugins.rs).
    assert!(
        matches!(&e, CallError::Failed(m) if m.contains("did not finish within 1.90 s")),
        "{e:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let e = r
        .sup
        .call(
            "p",
            "send",
            send_params("f", 1, json!({"fail": "SMTP said no"})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CallError::Failed(m) if m == "SMTP said no"),
        "{e:?}"
    );
    let e = r.sup.call("nope", "send", Map::new()).await.unwrap_err();
    assert!(matches!(e, CallError::NotConfigured(_)));
    r.sup.shutdown().await;
}

/// A batch of three where the middle one fails: each event gets its own
/// outcome, in order, and every one reached the plugin's `send`. `batched`
/// says whether the plugin offers `send_batch` (the Rust SDK does; the
/// stdlib plugin knows only `send`, and gets a `send` per event).
async fn a_batch_has_an_outcome_per_event(plugin: fn(&str, &Path) -> PluginConfig, batched: bool) {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let r = rig(dir, vec![plugin("p", &rec)]).await;
    let addr = r.store.addr_create().await.unwrap();
    assert_eq!(r.sup.batch_limit("p") > 1, batched, "batch limit");
    let events = vec![
        raw_params("ev-a", addr.id, json!({})),
        raw_params("ev-b", addr.id, json!({"fail": "not this one"})),
        raw_params("ev-c", addr.id, json!({})),
    ];
    let results = r.sup.send_batch("p", events).await;
    assert_eq!(results.len(), 3, "{results:?}");
    assert!(results[0].is_ok(), "{results:?}");
    assert!(
        matches!(&results[1], Err(CallError::Failed(m)) if m.contains("not this one")),
        "{results:?}"
    );
    assert!(results[2].is_ok(), "{results:?}");
    let mut sent: Vec<String> = plugin_calls(&rec, "send")
        .iter()
        .filter_map(|v| v["event_id"].as_str().map(String::from))
        .collect();
    sent.sort();
    assert_eq!(sent, ["ev-a", "ev-b", "ev-c"]);
    // Media travels in a batch too (the server sends it with `send`, but
    // the protocol allows it), decoded for the plugin.
    let got = plugin_calls(&rec, "send");
    assert!(got.iter().all(|g| g["media"] == json!(MEDIA)), "{got:?}");
    r.sup.shutdown().await;
}

#[tokio::test]
async fn rust_plugin_answers_a_batch_event_by_event() {
    a_batch_has_an_outcome_per_event(test_plugin, true).await;
}

#[tokio::test]
async fn a_plugin_without_send_batch_gets_a_send_per_event() {
    a_batch_has_an_outcome_per_event(python_plugin, false).await;
}

/// A plugin in another language answers `send_batch` as its language
/// says "no error": `null` and `true` are delivered like `{}`, an error
/// that is only a text fails with that text, and anything else fails
/// quoting it. (Reading the answer as a list of `{}` once failed the
/// whole batch, delivered events and all, at its first `null`.)
#[tokio::test]
async fn a_batch_answered_in_another_languages_words_is_read_event_by_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = PluginConfig::named("node");
    node.command = Some(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/plugins/node_plugin.js"
    )));
    node.config
        .insert("greeting".into(), Value::String("hi".into()));
    let r = rig(dir, vec![node]).await;
    let addr = r.store.addr_create().await.unwrap();
    let outcomes = [
        json!(null),
        json!(true),
        json!({}),
        json!({"error": null}),
        json!({"error": "the target said no"}),
        json!({"error": {"code": -32001, "message": "refused"}}),
        json!("ok"),
        // A wait as an HTTP header gives it: a text.
        json!({"error": {"code": -32002, "message": "slow down", "data": {"retry_after": "30"}}}),
        // No room for it now (the protocol's -32005): the work not done.
        json!({"error": {"code": -32005, "message": "no room now"}}),
    ];
    let events = outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| {
            raw_params(
                &format!("ev-{i}"),
                addr.id,
                json!({"room": "r", "outcome": o}),
            )
        })
        .collect();
    let results = r.sup.send_batch("node", events).await;
    assert_eq!(results.len(), outcomes.len(), "{results:?}");
    for (i, result) in results.iter().enumerate().take(4) {
        assert!(result.is_ok(), "outcome {i}: {results:?}");
    }
    assert!(
        matches!(&results[4], Err(CallError::Failed(m)) if m == "the target said no"),
        "{results:?}"
    );
    assert!(
        matches!(&results[5], Err(CallError::Rejected(m)) if m == "refused"),
        "{results:?}"
    );
    assert!(
        matches!(&results[6], Err(CallError::Failed(m)) if m.contains("send_batch answered \"ok\" for this event")),
        "{results:?}"
    );
    assert!(
        matches!(&results[7], Err(CallError::Later(m, wait)) if m == "slow down" && wait.as_secs() == 30),
        "{results:?}"
    );
    assert!(
        matches!(&results[8], Err(CallError::NotMade(p, m)) if p == "node" && m == "no room now"),
        "{results:?}"
    );
    // So is a `send` answered so.
    let busy = send_params("busy", addr.id, json!({"room": "r", "busy": true}));
    let result = r.sup.call("node", "send", busy).await;
    assert!(
        matches!(&result, Err(CallError::NotMade(p, m)) if p == "node" && m == "no room now"),
        "{result:?}"
    );

    // A whole answer that is not a list fails each event saying what it
    // was. Before, each got jsonrpsee's "Parse error: invalid type: map,
    // expected a sequence" as the plugin being unavailable.
    let whole = json!({"outcomes": [null, null]});
    let events = (0..2)
        .map(|i| {
            raw_params(
                &format!("w-{i}"),
                addr.id,
                json!({"room": "r", "whole": whole}),
            )
        })
        .collect();
    for result in r.sup.send_batch("node", events).await {
        assert!(
            matches!(&result, Err(CallError::Failed(m))
                if m == r#"send_batch answered {"outcomes":[null,null]}, not a list of one outcome per event"#),
            "{result:?}"
        );
    }
    r.sup.shutdown().await;
}

/// A batch's events are in the plugin at once, with `send_batch` or
/// without it (then as concurrent `send` calls): three gated sends all
/// start before the gate opens, and each is delivered. One at a time,
/// the first would wait at the gate until its call timed out.
async fn a_batch_is_sent_at_once(plugin: fn(&str, &Path) -> PluginConfig) {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let gate = dir.path().join("gate");
    let r = rig(dir, vec![plugin("p", &rec)]).await;
    let addr = r.store.addr_create().await.unwrap();
    let config = json!({ "gate": gate });
    let events = ["ev-a", "ev-b", "ev-c"]
        .iter()
        .map(|id| raw_params(id, addr.id, config.clone()))
        .collect();
    let sup = r.sup.clone();
    let batch = tokio::spawn(async move { sup.send_batch("p", events).await });
    poll_until(Duration::from_secs(20), async || {
        match plugin_calls(&rec, "send_started") {
            started if started.len() >= 3 => Ok(()),
            started => Err(format!("started: {started:?}")),
        }
    })
    .await;
    std::fs::write(&gate, b"").unwrap();
    let results = batch.await.expect("the batch task");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(plugin_calls(&rec, "send").len(), 3);
    r.sup.shutdown().await;
}

#[tokio::test]
async fn rust_plugin_gets_a_batch_at_once() {
    a_batch_is_sent_at_once(test_plugin).await;
}

#[tokio::test]
async fn a_plugin_without_send_batch_gets_a_batch_at_once() {
    a_batch_is_sent_at_once(python_plugin).await;
}
