//! A seed-style Python plugin (`tests/plugins/robogercontrib/seed.py`,
//! written as the original's plugin guide says) running unmodified through
//! the `roboger-plugin-python` bridge and the real server.

use std::time::{Duration, Instant};

use roboger_tests::{
    HttpSink, Method, Server, ServerOptions, Value, assert_status, json, plugin_bin, poll_until,
    venv_python,
};

fn contrib() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins")
}

async fn server(extra: &str) -> Server {
    let contrib = contrib();
    Server::start_with(ServerOptions {
        plugins_yaml: format!(
            "- name: seed\n  python: robogercontrib.seed\n  command: {}\n  db: true\n  env: {{PYTHONPATH: {}}}\n{extra}",
            plugin_bin("python").display(),
            contrib.display()
        ),
        // The seed's examples log at DEBUG.
        env: vec![("RUST_LOG".into(), "info,roboger_server::plugin_log=debug".into())],
        ..Default::default()
    })
    .await
}

/// A plugin in plain Python that logs with the `logging` module's
/// defaults (`WARNING:stdlib:loaded with …` on stderr) has its lines at
/// their levels in the server's log. Before, the level was read only
/// when a space or `: ` followed it, so every such line was INFO, errors
/// included.
#[tokio::test]
async fn a_python_plugins_logging_lines_keep_their_levels() {
    let plugin = contrib().join("stdlib_plugin.py");
    let s = Server::start_with(ServerOptions {
        plugins_yaml: format!(
            "- name: py\n  command: {}\n  config: {{answer: 42}}\n",
            plugin.display()
        ),
        ..Default::default()
    })
    .await;
    let said = "stdlib:loaded with {\"answer\": 42}";
    s.wait_log(said, Duration::from_secs(10)).await;
    let line = s.log_lines(said).join("\n");
    assert!(
        line.contains("WARN") && line.contains("plugin=py") && !line.contains("WARNING:"),
        "{line}"
    );
}

/// A module that wraps its INSERT in BEGIN and COMMIT, each a call of
/// its own, is told that a transaction cannot span calls, and its
/// INSERT is committed on its own. Before, its BEGIN left a transaction
/// open on a pooled connection: on SQLite, holding the write lock, every
/// push after it was a 503 until the server restarted.
#[tokio::test(flavor = "multi_thread")]
async fn a_modules_begin_and_commit_are_refused_and_leave_nothing_open() {
    let (s, a, out, _dir) = contrib_module_server("counter").await;
    for i in 0..3 {
        assert_status!(
            s.push(json!({"addr": a, "msg": format!("e{i}")})).await,
            202
        );
        let said = &read_records(&out, i + 1)[i];
        for word in ["BEGIN", "COMMIT"] {
            let refusal = said[word].as_str().unwrap_or_default();
            assert!(
                refusal.contains(&format!(
                    "{word} is not taken: each db_query and db_execute call is a transaction of its own"
                )),
                "{said}"
            );
        }
        assert_eq!(
            (&said["INSERT"], &said["count"]),
            (&json!("done"), &json!(i + 1)),
            "{said}"
        );
    }
    // Nothing was left open: pushes and management changes go on.
    for i in 0..5 {
        assert_status!(
            s.push(json!({"addr": a, "msg": format!("after {i}")}))
                .await,
            202
        );
    }
    assert_status!(s.manage(Method::POST, "/addr", None).await, 201);
    assert_eq!(read_records(&out, 8).len(), 8);
}

/// A module that makes its session read-only before it reads, a careful
/// author's habit, leaves the server's own statements alone: its SQL runs
/// on connections of its own. Before, the setting stayed on a connection
/// of the server's pool, and the server's writes that took it failed
/// (management changes answered 503, "read-only transaction").
#[tokio::test(flavor = "multi_thread")]
async fn a_modules_session_settings_stay_on_its_own_connections() {
    let (s, a, out, _dir) = contrib_module_server("readonly").await;
    for i in 0..5 {
        assert_status!(
            s.push(json!({"addr": a, "msg": format!("e{i}")})).await,
            202
        );
        let said = &read_records(&out, i + 1)[i];
        assert!(said["took"].is_string(), "no statement taken: {said}");
        assert!(said["addresses"].as_i64() >= Some(1), "{said}");
    }
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(s.manage(Method::POST, "/addr", None).await.status.as_u16());
        answers.push(
            s.push(json!({"addr": a, "msg": "after"}))
                .await
                .status
                .as_u16(),
        );
    }
    assert!(
        answers.iter().all(|&st| st == 201 || st == 202),
        "{answers:?}\n{}",
        s.log_text()
    );
}

/// A server running `robogercontrib.NAME` as plugin NAME with `db: true`,
/// an address with an endpoint of it whose `out` is a file in the
/// directory returned: the server, the address, the file.
async fn contrib_module_server(
    name: &str,
) -> (Server, String, std::path::PathBuf, tempfile::TempDir) {
    let s = Server::start_with(ServerOptions {
        plugins_yaml: format!(
            "- name: {name}\n  python: robogercontrib.{name}\n  command: {}\n  db: true\n  env: {{PYTHONPATH: {}}}\n",
            plugin_bin("python").display(),
            contrib().display()
        ),
        ..Default::default()
    })
    .await;
    let (id, a) = s.new_addr().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    s.endpoint(id, name, json!({"out": out.display().to_string()}))
        .await;
    (s, a, out, dir)
}

fn read_records(path: &std::path::Path, n: usize) -> Vec<Value> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < end,
            "{} of {n} events recorded",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_seed_module_runs_unmodified() {
    let s = server("  config: {greeting: hi}\n").await;
    let plugins = s.manage(Method::GET, "/plugin", None).await.json();
    assert_eq!(
        (
            &plugins[0]["plugin_name"],
            &plugins[0]["version"],
            &plugins[0]["description"],
            &plugins[0]["state"]
        ),
        (
            &json!("seed"),
            &json!("0.3.0"),
            &json!("seed-style test plugin"),
            &json!("running")
        ),
        "{plugins}"
    );
    s.wait_log(
        "robogercontrib.seed loaded, greeting hi",
        Duration::from_secs(10),
    )
    .await;

    // validate_config raising is a 400 with its message.
    let (id, a) = s.new_addr().await;
    let r = s
        .try_endpoint(id, "seed", json!({"out": "/tmp/x", "oot": 1}))
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("unknown key(s): oot"), "{}", r.text);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    s.endpoint(id, "seed", json!({"out": out.display().to_string()}))
        .await;

    let r = s
        .push(json!({"addr": a, "msg": "hello $(id) \"x\"", "level": "error", "sender": "bot"}))
        .await;
    assert_status!(r, 202);
    let rec = &read_records(&out, 1)[0];
    assert_eq!(rec["msg"], "hello $(id) \"x\"");
    assert_eq!(
        (rec["level"].as_i64(), rec["subject"].as_str()),
        (Some(40), Some("ERROR bot"))
    );
    assert_eq!(
        (rec["timeout"].as_f64(), rec["warn"].as_i64()),
        (Some(2.0), Some(30)),
        "the harness sets timeout: 2"
    );
    assert_eq!(
        (rec["limits"].as_bool(), rec["spawned"].as_i64()),
        (Some(false), Some(42))
    );
    assert_eq!(rec["stored"], "hello $(id) \"x\"");
    assert_eq!(rec["creator"], "plugin.seed");
    // get_db() runs SQL through the server; get_plugin() calls a plugin's
    // method through it (here this one's validate_config, which refuses).
    assert_eq!(rec["db"], 7);
    // A row's id, the original's way: `lastrowid` where the database has
    // no RETURNING (MySQL), else `INSERT … RETURNING`. Before db_insert,
    // `lastrowid` was always None, and on MySQL the row was not found.
    assert_eq!(rec["row_msg"], "hello $(id) \"x\"", "{rec}");
    if roboger_tests::on_postgres() {
        assert!(rec["lastrowid"].is_null(), "{rec}");
    } else {
        assert!(rec["lastrowid"].as_i64().is_some_and(|id| id > 0), "{rec}");
    }
    assert!(
        rec["other_plugin"]
            .as_str()
            .unwrap_or_default()
            .contains("oops"),
        "{rec}"
    );
    // bucket_put(public=True) is readable at /file/{id}.
    let object = rec["object_id"].as_str().expect("an object id");
    let r = s
        .request(Method::GET, &format!("/file/{object}"), None, &[], None)
        .await;
    assert_status!(r, 200);
    assert_eq!(r.text, "hello $(id) \"x\"");
    assert_eq!(r.header("roboger-file-name"), Some("msg.txt"));
    // The logger and log_traceback reach the server's log.
    s.wait_log("ZeroDivisionError", Duration::from_secs(10))
        .await;
    s.wait_log(
        "robogercontrib.seed oops, error: division by zero",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        s.wait_settled(id).await["deliveries"][0]["state"],
        "delivered"
    );

    // get_app() routes answer under /plugin/seed/.
    let r = s
        .request(Method::GET, "/plugin/seed/hello/world", None, &[], None)
        .await;
    assert_status!(r, 200);
    let body = r.json();
    assert_eq!(
        (&body["hello"], &body["greeting"], &body["ip"]),
        (&json!("world"), &json!("hi"), &json!("127.0.0.1"))
    );
    let r = s
        .request(Method::GET, "/plugin/seed/nope", None, &[], None)
        .await;
    assert_status!(r, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_plugin_config_keeps_the_module_out() {
    let s = server("  config: {colour: red}\n").await;
    s.wait_log("only greeting is accepted", Duration::from_secs(10))
        .await;
    let (id, _) = s.new_addr().await;
    let r = s.try_endpoint(id, "seed", json!({"out": "/tmp/x"})).await;
    assert_status!(r, 503);
    assert!(r.text.contains("refused"), "{}", r.text);
    let plugins = s.manage(Method::GET, "/plugin", None).await.json();
    assert_eq!(plugins[0]["state"], "refused", "{plugins}");
}

/// Deliveries waiting at once reach a seed module through the bridge's
/// `send_batch`, each with its own outcome: a burst to an address with
/// two endpoints, one whose file cannot be written, delivers every event
/// to the other, and the metrics show calls that carried several events.
/// (A small burst: each of the seed's sends calls the plugin itself back
/// through the server, which needs room under its `max-inflight`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_goes_in_batches_each_event_with_its_own_outcome() {
    let s = server("").await;
    let (id, a) = s.new_addr().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    s.endpoint(id, "seed", json!({"out": out.display().to_string()}))
        .await;
    s.endpoint(id, "seed", json!({"out": "/nonexistent-dir/events.jsonl"}))
        .await;
    let pushes = (0..12).map(|i| {
        let s = &s;
        let a = a.clone();
        async move {
            s.push(json!({"addr": a, "msg": format!("burst {i}")}))
                .await
        }
    });
    for r in futures_util::future::join_all(pushes).await {
        assert_status!(r, 202);
    }
    poll_until(Duration::from_secs(30), async || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let msgs: std::collections::BTreeSet<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|r| r["msg"].as_str().map(String::from))
            .collect();
        match msgs.len() {
            12 => Ok(()),
            _ => Err(format!("delivered only {msgs:?}")),
        }
    })
    .await;

    // Every good delivery counted, and every bad one tried at least once.
    let m = poll_until(Duration::from_secs(30), async || {
        let m = s.metrics().await;
        let at = |k: &str| m.get(k).copied().unwrap_or(0.0);
        match at("roboger_deliveries_total{outcome=\"delivered\",plugin=\"seed\"}") >= 12.0
            && at("roboger_deliveries_total{outcome=\"retry\",plugin=\"seed\"}") >= 12.0
        {
            true => Ok(m),
            false => Err(format!("outcomes never counted: {m:?}")),
        }
    })
    .await;
    let at = |k: &str| m.get(k).copied().unwrap_or(0.0);
    let delivered = at("roboger_deliveries_total{outcome=\"delivered\",plugin=\"seed\"}");
    assert_eq!(delivered, 12.0, "each good delivery made once");
    let calls = at("roboger_plugin_call_events_count{plugin=\"seed\"}");
    let events = at("roboger_plugin_call_events_sum{plugin=\"seed\"}");
    assert!(
        calls < events,
        "{calls} calls for {events} events: no batch"
    );
}

/// The egress policy the server sends in `hello` holds for a module's
/// own connections (`fetch.py` POSTs with `urllib`), as it does for the
/// Rust plugins' HTTP client: a host name that resolves only to refused
/// addresses and a metadata address refused by default each fail the
/// delivery once, naming the rule, with nothing sent; a plugin's own
/// policy that allows the address delivers.
#[tokio::test(flavor = "multi_thread")]
async fn the_egress_policy_holds_for_a_modules_own_connections() {
    let sink = HttpSink::start(vec![]).await;
    let entry = |name: &str, egress: &str| {
        format!(
            "- name: {name}\n  python: robogercontrib.fetch\n  command: {}\n  env: {{PYTHONPATH: {}}}\n{egress}",
            plugin_bin("python").display(),
            contrib().display()
        )
    };
    let s = Server::start_with(ServerOptions {
        yaml: "egress:\n  deny: [127.0.0.0/8, '::1']\n".into(),
        plugins_yaml: entry("fetch", "")
            + &entry("fetch_open", "  egress:\n    allow: [127.0.0.1]\n"),
        ..Default::default()
    })
    .await;
    let port = sink.base.rsplit(':').next().unwrap_or_default();
    let local = format!("http://localhost:{port}/x");

    let (id, a) = s.new_addr().await;
    s.endpoint(id, "fetch", json!({ "url": local })).await;
    assert_status!(s.push(json!({"addr": a, "msg": "denied"})).await, 202);
    let (state, attempts, error) = s.settled_delivery(id).await;
    assert_eq!((state.as_str(), attempts), ("failed", 1), "{error}");
    assert_eq!(
        error,
        "egress refused: 127.0.0.1 is in 127.0.0.0/8 (denied by the egress policy)"
    );

    let (id, a) = s.new_addr().await;
    s.endpoint(
        id,
        "fetch_open",
        json!({"url": "http://169.254.169.254/latest"}),
    )
    .await;
    assert_status!(s.push(json!({"addr": a, "msg": "metadata"})).await, 202);
    let (state, attempts, error) = s.settled_delivery(id).await;
    assert_eq!((state.as_str(), attempts), ("failed", 1), "{error}");
    assert_eq!(
        error,
        "egress refused: 169.254.169.254 is in 169.254.0.0/16 \
         (link-local and cloud metadata, denied by default)"
    );
    assert!(sink.requests().is_empty(), "nothing was sent");

    let (id, a) = s.new_addr().await;
    s.endpoint(id, "fetch_open", json!({ "url": local })).await;
    assert_status!(s.push(json!({"addr": a, "msg": "allowed"})).await, 202);
    let (state, _, error) = s.settled_delivery(id).await;
    assert_eq!(state, "delivered", "{error}");
    let got = sink.wait(1).await;
    assert_eq!(
        (got[0].path.as_str(), &got[0].body[..]),
        ("/x", &b"allowed"[..])
    );
}

/// A server config whose backoff starts at 2 s.
const RETRY_IN_2S: &str = "delivery:\n  retry-base: 2\n";

/// A server with `fetch.py` as plugin `fetch`, allowed to connect to
/// loopback; `yaml` is the server's config, and `env` adds entries to
/// the plugin's environment's YAML map (`, KEY: VALUE`).
async fn fetch_server(yaml: &str, env: &str) -> Server {
    Server::start_with(ServerOptions {
        yaml: yaml.into(),
        plugins_yaml: format!(
            "- name: fetch\n  python: robogercontrib.fetch\n  command: {}\n  env: {{PYTHONPATH: {}{env}}}\n  egress:\n    allow: [127.0.0.1]\n",
            plugin_bin("python").display(),
            contrib().display()
        ),
        ..Default::default()
    })
    .await
}

/// A module's send that fails on a 429 or 503 with `Retry-After` (here
/// `urllib`'s HTTPError, as `fetch.py` lets it rise), or raises its own
/// exception with a `retry_after`, is not tried again before then: the
/// bridge passes the wait on to the server.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_reaches_the_server_from_a_module() {
    let sink = HttpSink::retry_after(vec![429], "30").await;
    let s = fetch_server(RETRY_IN_2S, "").await;
    let (id, a) = s.new_addr().await;
    let url = format!("{}/x", sink.base);
    let answered = s.endpoint(id, "fetch", json!({ "url": url })).await;
    // A module's own exception with `retry_after` (seconds).
    let raised = s
        .endpoint(id, "fetch", json!({"url": url, "later": 45}))
        .await;
    assert_status!(s.push(json!({"addr": a, "msg": "later"})).await, 202);
    let waits = s.first_retry_waits(id, &[answered, raised]).await;
    let (wait, error) = &waits[0];
    assert!(
        (29.0..=31.0).contains(wait),
        "Retry-After: 30 gave {wait} s"
    );
    assert!(error.contains("429"), "{error}");
    let (wait, error) = &waits[1];
    assert!((44.0..=46.0).contains(wait), "retry_after 45 gave {wait} s");
    assert_eq!(error, "asked to wait 45 s");
}

/// The same through `requests` (in the test virtualenv, with
/// robogerctl): its `raise_for_status()` HTTPError, whose `response` is
/// a 429 with `Retry-After`, is read by the bridge as the wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_requests_http_error_with_retry_after_reaches_the_server() {
    let Some(python) = venv_python("requests (with robogerctl)") else {
        return;
    };
    let sink = HttpSink::retry_after(vec![429], "40").await;
    let s = fetch_server(
        RETRY_IN_2S,
        &format!(", ROBOGER_PYTHON: {}", python.display()),
    )
    .await;
    let (id, a) = s.new_addr().await;
    let url = format!("{}/x", sink.base);
    let ep = s
        .endpoint(id, "fetch", json!({"url": url, "client": "requests"}))
        .await;
    assert_status!(s.push(json!({"addr": a, "msg": "later"})).await, 202);
    let waits = s.first_retry_waits(id, &[ep]).await;
    let (wait, error) = &waits[0];
    assert!(
        (39.0..=41.0).contains(wait),
        "Retry-After: 40 gave {wait} s"
    );
    assert!(error.contains("429"), "{error}");
    assert_eq!(sink.requests().len(), 1);
}

/// A module's send that never returns keeps its Python thread (a thread
/// cannot be stopped), and every retry added one: after about two minutes
/// of a hung target the bridge could start no thread and served nothing,
/// while it still looked up. Once 32 calls have run past twice the
/// server's timeout it exits, says why, and is started afresh. Meanwhile
/// the deliveries batched with the hung ones are made: a batch answers
/// just before the server's timeout with the sends that ended (before,
/// the whole batch timed out with them).
#[tokio::test(flavor = "multi_thread")]
async fn a_module_whose_send_never_returns_is_started_afresh() {
    let s = fetch_server(
        "timeout: 1\ndelivery:\n  retry-base: 0.05\n  retry-max: 0.1\n  max-attempts: 1000\n",
        "",
    )
    .await;
    let (id, a) = s.new_addr().await;
    s.endpoint(
        id,
        "fetch",
        json!({"url": "http://127.0.0.1:9/", "hang": true}),
    )
    .await;
    for i in 0..5 {
        assert_status!(
            s.push(json!({"addr": a, "msg": format!("m{i}")})).await,
            202
        );
    }
    s.wait_log(
        "calls have run past twice the server's timeout and still run",
        Duration::from_secs(60),
    )
    .await;
    poll_until(Duration::from_secs(30), async || {
        let p = s.manage(Method::GET, "/plugin", None).await.json();
        match (p[0]["state"].as_str(), p[0]["restarts"].as_u64()) {
            (Some("running"), Some(n)) if n >= 1 => Ok(()),
            _ => Err(format!("{p}")),
        }
    })
    .await;
}

/// A module whose send calls `sys.exit()` (which ends a Python thread
/// unseen) fails that delivery at once, naming it, and the delivery
/// batched with it is made. Before, an event with media (sent alone, with
/// `send`) got no answer until the server's timeout, and one in a batch
/// failed as "did not finish within 57.00 s", at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_module_that_calls_sys_exit_fails_only_that_delivery() {
    let sink = HttpSink::start(vec![]).await;
    let s = fetch_server("timeout: 60\ndelivery:\n  max-attempts: 1\n", "").await;
    let (id, a) = s.new_addr().await;
    let url = format!("{}/hook", sink.base);
    let exits = s
        .endpoint(id, "fetch", json!({"url": url, "exit": true}))
        .await;
    let fine = s.endpoint(id, "fetch", json!({"url": url})).await;
    for (n, event) in [
        json!({"addr": a, "msg": "batched"}),
        json!({"addr": a, "msg": "alone", "media": "aGVsbG8="}),
    ]
    .into_iter()
    .enumerate()
    {
        assert_status!(s.push(event).await, 202);
        s.endpoint_settles(id, fine, n as u64 + 1, 0).await;
        s.endpoint_settles(id, exits, 0, n as u64 + 1).await;
        let ep = s
            .manage(Method::GET, &format!("/addr/{id}/endpoint/{exits}"), None)
            .await
            .json();
        assert_eq!(ep["last_error"], "the module raised SystemExit(3)", "{ep}");
    }
    assert_eq!(sink.wait(2).await.len(), 2);
}
