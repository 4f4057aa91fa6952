//! Plugins as separate processes, seen through the real server: the
//! manifest and state in `GET /manage/v2/plugin`, endpoint configs checked
//! by the plugin, restarts by hand, and survival of plugins that crash,
//! hang, write garbage or speak the wrong protocol. Every plugin here is
//! the misbehaving test plugin (`tests/src/bin/roboger-test-plugin.rs`).

use std::time::{Duration, Instant};

use roboger_tests::{
    Method, Server, ServerOptions, Value, assert_status, json, pid_alive, poll_until, sha256_hex,
    test_plugin_bin,
};

fn entry(name: &str, mode: &str, extra_env: &str) -> String {
    format!(
        "- name: {name}\n  command: {}\n  config: {{answer: 42}}\n  env:\n    TEST_PLUGIN_MODE: '{mode}'\n{extra_env}",
        test_plugin_bin().display()
    )
}

async fn plugin(s: &Server, name: &str) -> Value {
    let list = s.manage(Method::GET, "/plugin", None).await.json();
    list.as_array()
        .unwrap()
        .iter()
        .find(|p| p["plugin_name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no plugin {name} in {list}"))
}

/// Polls a plugin's status until `pred` holds (or panics after 15 s).
async fn wait_plugin(s: &Server, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    poll_until(Duration::from_secs(15), async || {
        let p = plugin(s, name).await;
        match pred(&p) {
            true => Ok(p),
            false => Err(format!("plugin {name} never became {what}: {p}")),
        }
    })
    .await
}

fn records(path: &std::path::Path) -> Vec<Value> {
    roboger_tests::json_lines(path)
}

#[tokio::test]
async fn manifest_state_environment_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let s = Server::start_with(ServerOptions {
        plugins_yaml: entry(
            "t",
            "normal",
            &format!(
                "    TEST_PLUGIN_RECORD: {}\n    TEST_PLUGIN_EXTRA: extra\n",
                rec.display()
            ),
        ),
        env: vec![("ROBOGER_MASTERKEY".into(), roboger_tests::KEY.into())],
        ..Default::default()
    })
    .await;
    let p = plugin(&s, "t").await;
    assert_eq!(p["state"], "running", "{p}");
    assert_eq!(
        (p["version"].as_str(), p["description"].as_str()),
        (Some("9.9.9"), Some("misbehaves on demand"))
    );
    assert_eq!(p["url"], "https://example.invalid/test-plugin");
    assert_eq!(p["restarts"], 0);
    let pid = p["pid"].as_u64().unwrap();
    assert!(pid_alive(pid));

    let r = records(&rec);
    let start = r.iter().find(|x| x["method"] == "start").unwrap();
    assert_eq!(
        start["env_masterkey"],
        Value::Null,
        "the master key must not reach plugins"
    );
    assert_eq!(start["env_extra"], "extra");
    let validate = r
        .iter()
        .position(|x| x["method"] == "validate_plugin_config")
        .unwrap();
    let load = r.iter().position(|x| x["method"] == "load").unwrap();
    assert!(validate < load, "validate_plugin_config runs before load");
    assert_eq!(r[load]["plugin_config"], json!({"answer": 42}));
    // The plugin's tracing output reaches the server's log, tagged.
    s.wait_log(
        "test plugin loaded with {\"answer\":42}",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        s.log_lines("test plugin loaded")
            .iter()
            .any(|l| l.contains("test plugin loaded") && l.contains("plugin=t"))
    );

    // Restart by hand: a new process, serving again.
    assert_status!(
        s.manage(Method::POST, "/plugin/t", Some(json!({"cmd": "restart"})))
            .await,
        204
    );
    let p = wait_plugin(&s, "t", "restarted", |p| {
        p["state"] == "running" && p["pid"].as_u64() != Some(pid)
    })
    .await;
    assert!(!pid_alive(pid), "the old process is gone");
    assert!(pid_alive(p["pid"].as_u64().unwrap()));
    assert_status!(
        s.manage(
            Method::POST,
            "/plugin/nope",
            Some(json!({"cmd": "restart"}))
        )
        .await,
        404
    );
    assert_status!(
        s.manage(Method::POST, "/plugin/t", Some(json!({"cmd": "explode"})))
            .await,
        405
    );
}

#[tokio::test]
async fn endpoint_configs_are_checked_by_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let s = Server::start_with(ServerOptions {
        plugins_yaml: entry(
            "t",
            "normal",
            &format!("    TEST_PLUGIN_RECORD: {}\n", rec.display()),
        ),
        ..Default::default()
    })
    .await;
    let a = s.manage(Method::POST, "/addr", None).await.json()["id"]
        .as_i64()
        .unwrap();
    let r = s
        .manage(
            Method::POST,
            &format!("/addr/{a}/endpoint"),
            Some(json!({"plugin_name": "t", "config": {"reject": "url is required"}})),
        )
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("url is required"), "{}", r.text);
    let r = s
        .manage(
            Method::POST,
            &format!("/addr/{a}/endpoint"),
            Some(json!({"plugin_name": "t", "config": {"url": "x"}})),
        )
        .await;
    assert_status!(r, 201);
    let ep = r.json()["id"].as_i64().unwrap();
    let r = s
        .manage(
            Method::PATCH,
            &format!("/addr/{a}/endpoint/{ep}"),
            Some(json!({"config": {"reject": "no"}})),
        )
        .await;
    assert_status!(r, 400);
    assert_eq!(
        s.manage(Method::GET, &format!("/addr/{a}/endpoint/{ep}"), None)
            .await
            .json()["config"],
        json!({"url": "x"})
    );
    let seen: Vec<Value> = records(&rec)
        .into_iter()
        .filter(|x| x["method"] == "validate_config")
        .map(|x| x["config"].clone())
        .collect();
    assert_eq!(
        seen,
        [
            json!({"reject": "url is required"}),
            json!({"url": "x"}),
            json!({"reject": "no"})
        ]
    );
    // core cleanup reaches the plugin.
    assert_status!(
        s.manage(Method::POST, "/core", Some(json!({"cmd": "cleanup"})))
            .await,
        204
    );
    assert!(records(&rec).iter().any(|x| x["method"] == "cleanup"));
}

#[tokio::test]
async fn misbehaving_plugins_are_survived() {
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::new();
    for (name, mode) in [
        ("wrongver", "wrong-version"),
        ("early", "exit-before-handshake"),
        ("inload", "exit-in-load"),
        ("garbage", "garbage"),
        ("flood", "flood"),
        ("refuser", "refuse-config"),
        ("good", "normal"),
    ] {
        yaml.push_str(&entry(name, mode, "    TEST_PLUGIN_FLOOD: '200000'\n"));
    }
    let s = Server::start_with(ServerOptions {
        yaml: "plugin-max-line: 65536\n".into(),
        plugins_yaml: yaml,
        ..Default::default()
    })
    .await;
    let _ = dir;
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
    assert_eq!(plugin(&s, "good").await["state"], "running");

    // Wrong protocol and refused config: kept out, no restart loop.
    let p = wait_plugin(&s, "wrongver", "refused", |p| p["state"] == "refused").await;
    assert!(
        p["last_error"].as_str().unwrap().contains("incompatible"),
        "{p}"
    );
    let p = wait_plugin(&s, "refuser", "refused", |p| p["state"] == "refused").await;
    assert!(
        p["last_error"]
            .as_str()
            .unwrap()
            .contains("refuses every plugin config"),
        "{p}"
    );
    // Early exits, garbage and an over-long line are restarted with
    // backoff. An early exit says how it exited and the last error it
    // wrote, whichever step of the start it ended in.
    for (name, why) in [
        (
            "early",
            "handshake failed: connection closed: the stream was closed; \
             process exited (exit status: 3): told to exit before the handshake",
        ),
        (
            "inload",
            "load failed: connection closed: the stream was closed; \
             process exited (exit status: 4): told to exit in load",
        ),
        (
            "garbage",
            "this is not JSON; \
             this stream carries only JSON-RPC messages (a plugin writes its log to stderr)",
        ),
        ("flood", "longer than the line limit"),
    ] {
        let p = wait_plugin(&s, name, "restarted", |p| {
            p["restarts"].as_u64().unwrap_or(0) >= 2
        })
        .await;
        assert!(
            p["last_error"].as_str().unwrap_or("").contains(why),
            "{name}: {p}"
        );
        assert!(
            ["starting", "restarting", "failed"].contains(&p["state"].as_str().unwrap()),
            "{p}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for name in ["wrongver", "refuser"] {
        assert_eq!(
            plugin(&s, name).await["restarts"],
            0,
            "{name} is not restarted in a loop"
        );
    }
    // The good plugin and the server kept working throughout.
    let a = s.manage(Method::POST, "/addr", None).await.json()["id"]
        .as_i64()
        .unwrap();
    assert_status!(
        s.manage(
            Method::POST,
            &format!("/addr/{a}/endpoint"),
            Some(json!({"plugin_name": "good"}))
        )
        .await,
        201
    );
    let r = s
        .manage(
            Method::POST,
            &format!("/addr/{a}/endpoint"),
            Some(json!({"plugin_name": "wrongver"})),
        )
        .await;
    assert_status!(r, 503);
    assert!(r.text.contains("wrongver"), "{}", r.text);
}

#[tokio::test]
async fn a_pinned_executable_must_match_its_sha256() {
    let digest = sha256_hex(&std::fs::read(test_plugin_bin()).unwrap());
    let s = Server::start_with(ServerOptions {
        plugins_yaml: format!(
            "{}  sha256: {digest}\n{}  sha256: {}\n",
            entry("pinned", "normal", ""),
            entry("tampered", "normal", ""),
            "0".repeat(64)
        ),
        ..Default::default()
    })
    .await;
    assert_eq!(plugin(&s, "pinned").await["state"], "running");
    let p = wait_plugin(&s, "tampered", "refused", |p| p["state"] == "refused").await;
    assert!(p["last_error"].as_str().unwrap().contains("SHA-256"), "{p}");
    assert_eq!(p["pid"], Value::Null);
}

#[tokio::test]
async fn killed_and_hanging_plugins_are_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let s = Server::start_with(ServerOptions {
        yaml: "timeout: 0.5\nplugin-health-interval: 0.3\n".into(),
        plugins_yaml: entry(
            "t",
            "normal",
            &format!("    TEST_PLUGIN_RECORD: {}\n", rec.display()),
        ),
        ..Default::default()
    })
    .await;
    // SIGKILL: restarted, serving again.
    let pid = plugin(&s, "t").await["pid"].as_u64().unwrap();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let p = wait_plugin(&s, "t", "running again", |p| {
        p["state"] == "running" && p["pid"].as_u64() != Some(pid)
    })
    .await;
    assert!(p["restarts"].as_u64().unwrap() >= 1);
    let a = s.manage(Method::POST, "/addr", None).await.json()["id"]
        .as_i64()
        .unwrap();
    assert_status!(
        s.manage(
            Method::POST,
            &format!("/addr/{a}/endpoint"),
            Some(json!({"plugin_name": "t"}))
        )
        .await,
        201
    );

    // A plugin that stops answering (the process is frozen) fails the call
    // in flight, is killed after missed pings and restarted.
    let frozen = p["pid"].as_u64().unwrap();
    let t = Instant::now();
    let r = s
        .manage(
            Method::POST,
            &format!("/addr/{a}/endpoint"),
            Some(json!({"plugin_name": "t", "config": {"freeze": true}})),
        )
        .await;
    assert_eq!(
        r.status.as_u16(),
        503,
        "{}\n{}\n{}",
        r.text,
        s.log_text(),
        std::fs::read_to_string(&rec).unwrap_or_default()
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the call waited {:?}",
        t.elapsed()
    );
    let p = wait_plugin(&s, "t", "replaced", |p| {
        p["state"] == "running" && p["pid"].as_u64() != Some(frozen)
    })
    .await;
    assert!(
        p["last_error"].as_str().unwrap_or("").contains("ping"),
        "{p}"
    );
    poll_until(Duration::from_secs(5), async || match pid_alive(frozen) {
        false => Ok(()),
        true => Err("the frozen plugin was not killed".to_string()),
    })
    .await;
    assert_status!(
        s.manage(
            Method::POST,
            &format!("/addr/{a}/endpoint"),
            Some(json!({"plugin_name": "t"}))
        )
        .await,
        201
    );
}

#[tokio::test]
async fn no_plugin_outlives_the_server() {
    let opts = ServerOptions {
        plugins_yaml: format!("{}{}", entry("a", "normal", ""), entry("b", "normal", "")),
        ..Default::default()
    };
    // Graceful: SIGTERM stops the plugins before the server exits.
    let mut s = Server::start_with(opts.clone()).await;
    let pids = plugin_pids(&s, &["a", "b"]).await;
    assert!(pids.iter().all(|p| pid_alive(*p)));
    assert!(s.terminate().success());
    for p in &pids {
        assert!(!pid_alive(*p), "plugin {p} outlived a graceful shutdown");
    }

    // SIGKILL of the server: plugins see stdin close and exit by themselves.
    let s = Server::start_with(opts).await;
    let pids = plugin_pids(&s, &["a", "b"]).await;
    std::process::Command::new("kill")
        .args(["-9", &s.pid().to_string()])
        .status()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| pid_alive(*p)) {
        assert!(Instant::now() < end, "plugins outlived a killed server");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn plugin_pids(s: &Server, names: &[&str]) -> Vec<u64> {
    let mut out = Vec::new();
    for n in names {
        out.push(plugin(s, n).await["pid"].as_u64().unwrap());
    }
    out
}

#[tokio::test]
async fn a_call_waits_for_a_plugin_that_is_starting() {
    let s = Server::start_with(ServerOptions {
        plugins_yaml: entry("t", "normal", "    TEST_PLUGIN_START_DELAY_MS: '600'\n"),
        ..Default::default()
    })
    .await;
    let (id, _) = s.new_addr().await;
    assert_status!(
        s.manage(Method::POST, "/plugin/t", Some(json!({"cmd": "restart"})))
            .await,
        204
    );
    wait_plugin(&s, "t", "starting", |p| p["state"] == "starting").await;
    // The restart takes 600 ms; a call made meanwhile (the plugin checks
    // the endpoint's config) waits for it instead of failing with 503.
    let r = s.try_endpoint(id, "t", json!({})).await;
    assert_status!(r, 201);
    assert_eq!(plugin(&s, "t").await["state"], "running");
}

/// A plugin's stderr is read to its end whatever it writes: a line that
/// is not UTF-8 is logged with a replacement character, and one of
/// 64 MiB is cut, in bounded memory, so the error line after it still
/// says why the plugin ended. (Read whole, the line alone would take
/// the server past 64 MiB; unread, the plugin would block on its stderr
/// and be cut at the start's timeout instead.)
#[tokio::test]
async fn a_plugin_flooding_its_stderr_is_read_in_bounded_memory() {
    let flood = 64 << 20;
    let s = Server::start_with(ServerOptions {
        plugins_yaml: entry(
            "t",
            "stderr-flood",
            &format!("    TEST_PLUGIN_FLOOD: '{flood}'\n"),
        ),
        ..Default::default()
    })
    .await;
    let p = wait_plugin(&s, "t", "restarted", |p| {
        p["restarts"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let error = p["last_error"].as_str().unwrap_or("");
    assert!(
        error.ends_with("process exited (exit status: 3): after the flood"),
        "{p}"
    );
    let within = Duration::from_secs(5);
    s.wait_log("caf\u{fffd} is not UTF-8", within).await;
    s.wait_log(
        &format!("[{} more bytes of this line dropped]", flood - 16 * 1024),
        within,
    )
    .await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap_or_default();
    let peak_mib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(u64::MAX);
    assert!(peak_mib < 48, "the server's peak RSS is {peak_mib} MiB");
}

/// A plugin that writes its log in a loop (here 3,000 lines on its
/// stderr at each start) has at most 1,000 lines a minute in the
/// server's log, across its restarts; the log says when it starts to
/// drop them and, once the process has ended, how many it dropped.
/// Before, every line was written: one plugin printing in a loop put
/// 554,000 lines (59 MB) in the log in 8 s, burying the server's own
/// lines and, under systemd, making journald's rate limit drop them.
#[tokio::test]
async fn a_plugin_flooding_its_log_has_a_thousand_lines_a_minute() {
    let s = Server::start_with(ServerOptions {
        plugins_yaml: entry("t", "chatty", ""),
        ..Default::default()
    })
    .await;
    let within = Duration::from_secs(20);
    let dropping = "the plugin has written 1000 log lines in a minute";
    s.wait_log(dropping, within).await;
    // Its lines: those it wrote (the sandbox's report among them), not
    // what the server says of them.
    let written = || {
        s.log_lines("roboger_server::plugin_log:")
            .iter()
            .filter(|l| !l.contains(dropping) && !l.contains("log lines of the plugin dropped"))
            .count()
    };
    // Its restart by hand ends the first process, whose drops are said.
    let r = s
        .manage(Method::POST, "/plugin/t", Some(json!({"cmd": "restart"})))
        .await;
    assert_status!(r, 204);
    s.wait_log(
        "log lines of the plugin dropped before its process ended",
        within,
    )
    .await;
    assert_eq!(written(), 1000);
    // The second process's lines come within the same minute: dropped.
    poll_until(within, async || match s.log_lines(dropping).len() {
        2 => Ok(()),
        n => Err(format!("{n} lines say the drops began")),
    })
    .await;
    assert_eq!(written(), 1000);
    assert!(s.log_lines("chatty line").len() < 1000);
    let m = s.metrics().await;
    let dropped = m
        .get("roboger_plugin_log_dropped_total{plugin=\"t\"}")
        .copied()
        .unwrap_or_default();
    assert!(dropped > 2000.0, "{dropped} lines dropped");
    // The server's own lines are still written.
    s.new_addr().await;
    s.wait_log(
        "management change client=127.0.0.1 via=api method=POST path=/manage/v2/addr status=201",
        within,
    )
    .await;
}

/// A line a plugin sends through a `log` call is kept to 16 KiB in the
/// server's log, as a line of its stderr is, saying how much was
/// dropped. Before, a plugin that logged a response body of a megabyte
/// put a line of a megabyte there.
#[tokio::test]
async fn a_plugins_long_log_call_is_cut_as_its_stderr_lines_are() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let (id, a) = s.new_addr().await;
    let ep = s.endpoint(id, "t", json!({"log_bytes": 1 << 20})).await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    s.endpoint_settles(id, ep, 1, 0).await;
    let cut = (1 << 20) - 16 * 1024;
    s.wait_log(
        &format!("[{cut} more bytes of this line dropped]"),
        Duration::from_secs(5),
    )
    .await;
    let longest = s.log_text().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 17 * 1024, "a line of {longest} bytes");
}

/// A target that is down under a burst of pushes has at most 600 lines
/// a minute of its deliveries' retries in the server's log (and as many
/// of their failures for good), the log saying that the rest are
/// counted; before, each try wrote its line: 30,000 events to a target
/// down wrote 182,000 lines in 7 minutes, past what journald keeps of a
/// unit. Every outcome is still in the event API.
#[tokio::test]
async fn a_target_down_under_a_burst_has_600_retry_lines_a_minute() {
    let s = Server::start_with(ServerOptions::test_plugin(
        "delivery:\n  retry-base: 0.05\n  retry-max: 0.1\n  max-attempts: 10\n",
    ))
    .await;
    let (id, a) = s.new_addr().await;
    let ep = s
        .endpoint(id, "t", json!({"fail": "the target is down"}))
        .await;
    for i in 0..100 {
        assert_status!(
            s.push(json!({"addr": a, "msg": format!("m{i}")})).await,
            202
        );
    }
    s.endpoint_settles(id, ep, 0, 100).await;
    s.wait_log(
        "600 lines of deliveries that failed and are retried logged in a minute: the rest of \
         the minute's are not, but counted",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(s.log_lines("delivery failed, will retry").len(), 600);
    assert_eq!(s.log_lines("delivery failed for good").len(), 100);
    let m = s.metrics().await;
    let dropped = |outcome: &str| {
        m.get(&format!(
            "roboger_delivery_log_dropped_total{{outcome=\"{outcome}\"}}"
        ))
        .copied()
    };
    assert_eq!(
        (dropped("retry"), dropped("failed")),
        (Some(300.0), Some(0.0))
    );
}

/// A plugin whose start outlasts the call `timeout` (2 s here) still
/// starts, at its first attempt: a start has a timeout of its own (10 s at
/// least), and the server waits as long for its plugins' first start
/// before it listens. Cut at `timeout`, each attempt would be restarted
/// only to be cut short again.
#[tokio::test]
async fn a_plugin_slower_to_start_than_a_call_starts() {
    let s = Server::start_with(ServerOptions {
        plugins_yaml: entry("t", "normal", "    TEST_PLUGIN_START_DELAY_MS: '3000'\n"),
        ..Default::default()
    })
    .await;
    let p = plugin(&s, "t").await;
    assert_eq!(p["state"], "running", "{p}");
    assert_eq!(p["restarts"], 0, "{p}");
    let (id, _) = s.new_addr().await;
    assert_status!(s.try_endpoint(id, "t", json!({})).await, 201);
}

/// A plugin that never answers its handshake is not waited for forever:
/// its start is cut at the start's timeout (10 s) and it is restarted,
/// saying why; the server, which waits as long for its plugins' first
/// start, listens all the same. (Silent for 20 s, past the cut: a
/// plugin asleep before its handshake does not see its stdin close, so
/// one silent for ten minutes outlived the test that killed its server
/// by as long.)
#[tokio::test]
async fn a_plugin_silent_at_its_handshake_is_restarted() {
    let began = Instant::now();
    let s = Server::start_with(ServerOptions {
        plugins_yaml: entry("t", "normal", "    TEST_PLUGIN_START_DELAY_MS: '20000'\n"),
        ..Default::default()
    })
    .await;
    let p = wait_plugin(&s, "t", "restarted", |p| {
        p["restarts"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    assert!(
        p["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("handshake failed: no answer within 10s"),
        "{p}"
    );
    assert!(began.elapsed() >= Duration::from_secs(10), "{p}");
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
}

/// A send that never ends (`{"hang": true}`: a target with no timeout
/// that never answers) fails alone, just before the server's timeout,
/// and is dropped. Before, it was kept in the plugin's memory for good,
/// and as the server sends the deliveries due for one plugin in one
/// batch, it took the batch's other deliveries down with it: the other
/// endpoint's failed too, "send_batch timed out".
#[tokio::test]
async fn a_send_that_never_ends_fails_alone() {
    let why = fails_alone(1, json!({"hang": true})).await;
    assert!(why.contains("did not finish within 0.95 s"), "{why}");
}

/// With the server's `timeout` in seconds, an endpoint configured with
/// `broken` and a fine one of the same plugin get one event (in one
/// batch): the fine one is delivered, the broken one fails, and the
/// plugin is not restarted. Its delivery error.
async fn fails_alone(timeout: u32, broken: Value) -> String {
    let s = Server::start_with(ServerOptions::test_plugin(&format!(
        "timeout: {timeout}\ndelivery:\n  max-attempts: 1\n"
    )))
    .await;
    let (id, a) = s.new_addr().await;
    let broken = s.endpoint(id, "t", broken).await;
    let fine = s.endpoint(id, "t", json!({})).await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    s.endpoint_settles(id, fine, 1, 0).await;
    s.endpoint_settles(id, broken, 0, 1).await;
    let ep = s
        .manage(Method::GET, &format!("/addr/{id}/endpoint/{broken}"), None)
        .await
        .json();
    let p = plugin(&s, "t").await;
    assert_eq!(
        (p["state"].as_str(), p["restarts"].as_u64()),
        (Some("running"), Some(0)),
        "{p}"
    );
    ep["last_error"].as_str().unwrap_or_default().to_string()
}

/// A send that panics (a plugin's bug on one event) fails alone and at
/// once, with the panic's words, and the plugin goes on serving. Before,
/// the panic took down the task answering the whole batch: the server
/// waited out its timeout, and the other endpoint's delivery, sent in the
/// same batch, failed with it ("send_batch timed out").
#[tokio::test]
async fn a_send_that_panics_fails_alone() {
    // A timeout longer than `endpoint_settles` waits: no waiting it out.
    let why = fails_alone(60, json!({"panic": "a bug on this event"})).await;
    assert_eq!(why, "the plugin's send panicked: a bug on this event");
}

/// An event that makes its plugin exit each time it is sent (a poison
/// event) fails alone, saying why, and takes nothing else down. The
/// deliveries in flight when the plugin ended are each sent alone next
/// time; the one whose solo send ends the plugin again, once the plugin
/// has delivered others, is failed for good. Before, each crash spent an
/// attempt of everything in flight, the poison went out again with the
/// rest, and within seconds the plugin had crashed often enough to be
/// marked failed: every endpoint of it then waited minutes.
#[tokio::test]
async fn an_event_that_ends_its_plugin_fails_alone_and_the_rest_are_delivered() {
    let s = Server::start_with(ServerOptions::test_plugin(
        "timeout: 5\ndelivery:\n  retry-base: 0.2\n",
    ))
    .await;
    let (id, a) = s.new_addr().await;
    let poisoned = s
        .endpoint(id, "t", json!({"crash_on": "poison", "slow": 50}))
        .await;
    let other = s.endpoint(id, "t", json!({"slow": 50})).await;
    let pushes = (0..30).map(|i| {
        let msg = match i {
            15 => "poison".to_string(),
            i => format!("fine {i}"),
        };
        s.push(json!({"addr": a, "msg": msg}))
    });
    for r in futures_util::future::join_all(pushes).await {
        assert_status!(r, 202);
    }
    s.endpoint_settles(id, poisoned, 29, 1).await;
    s.endpoint_settles(id, other, 30, 0).await;
    // Running again once its last crash's short backoff is over (a plugin
    // marked failed would wait minutes).
    let p = wait_plugin(&s, "t", "running", |p| p["state"] == "running").await;
    assert!(p["restarts"].as_u64().unwrap() <= 3, "{p}");

    // The poison's delivery says what happened, and that it is not tried
    // again; the plugin, mended or not, serves everything else.
    let e = s.event_by_msg(id, "poison", 30).await;
    let d = e["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["endpoint_id"] == poisoned)
        .unwrap_or_else(|| panic!("no delivery to {poisoned} in {e}"));
    let why = d["last_error"].as_str().unwrap_or_default();
    assert_eq!(d["state"], "failed", "{d}");
    assert!(
        why.starts_with("plugin t ended while this event was being sent to it alone")
            && why.contains("exit status: 3")
            && why.contains("not tried again"),
        "{why}"
    );
    assert_status!(s.push(json!({"addr": a, "msg": "after"})).await, 202);
    s.endpoint_settles(id, poisoned, 30, 1).await;

    // Tried again by hand, it is sent alone at once, and fails alone.
    let restarts = plugin(&s, "t").await["restarts"].as_u64().unwrap();
    assert_status!(s.retry_endpoint(id, poisoned).await, 200);
    for i in 0..5 {
        assert_status!(
            s.push(json!({"addr": a, "msg": format!("later {i}")}))
                .await,
            202
        );
    }
    s.endpoint_settles(id, poisoned, 35, 1).await;
    s.endpoint_settles(id, other, 36, 0).await;
    // Its crash is counted as the supervisor restarts the plugin, which
    // may be just after the delivery's outcome is written.
    wait_plugin(&s, "t", "restarted once more", |p| {
        p["state"] == "running" && p["restarts"].as_u64() == Some(restarts + 1)
    })
    .await;
}

/// A plugin's error message is kept to 4 KiB, saying how much was left
/// out: before, a plugin that put a whole answer page in its error made
/// every try store all of it (900 KB here) and every listing of the
/// address's events send it; a refusal's 400 carried it whole too.
#[tokio::test]
async fn a_plugins_long_error_is_kept_to_4_kib() {
    // A two-byte character across the 4 KiB mark is left out whole.
    let long = format!("x{}{}", "é".repeat(3000), "y".repeat(100_000));
    let why = fails_alone(5, json!({ "fail": long })).await;
    let more = long.len() - 4095;
    assert_eq!(
        why,
        format!("x{}\u{2026} ({more} bytes more)", "é".repeat(2047))
    );
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let (id, _) = s.new_addr().await;
    let r = s.try_endpoint(id, "t", json!({ "reject": long })).await;
    assert_status!(r, 400);
    assert!(r.text.len() < 4200, "{} bytes", r.text.len());
    assert!(
        r.text.ends_with(&format!("({more} bytes more)")),
        "{}",
        &r.text[4000..]
    );
}

/// How many of the deliveries of `s` took `attempts` tries.
fn deliveries_tried(s: &Server, attempts: u32) -> String {
    s.db_client().query(&format!(
        "SELECT count(*) FROM delivery WHERE attempts = {attempts}"
    ))
}

/// The tries `roboger_deliveries_total` counted for plugin `t`:
/// delivered, retry and failed.
async fn tries_counted(s: &Server) -> [Option<f64>; 3] {
    let m = s.metrics().await;
    ["delivered", "retry", "failed"].map(|outcome| {
        m.get(&format!(
            "roboger_deliveries_total{{outcome=\"{outcome}\",plugin=\"t\"}}"
        ))
        .copied()
    })
}

/// An event pushed while its plugin restarts (a restart by hand, a
/// reload, or after a crash) is delivered once the plugin is back, with
/// its attempts unspent: the plugin never saw it. Before, a call that
/// found the plugin still starting after a second spent an attempt, and
/// with `max-attempts: 1` the event failed for good, never sent.
#[tokio::test]
async fn an_event_pushed_while_its_plugin_restarts_is_sent_once_it_is_back() {
    let s = Server::start_with(ServerOptions {
        plugins_yaml: entry("t", "normal", "    TEST_PLUGIN_START_DELAY_MS: '2500'\n"),
        yaml: "delivery:\n  max-attempts: 1\n  retry-base: 0.2\n".into(),
        ..Default::default()
    })
    .await;
    let (id, a) = s.new_addr().await;
    let ep = s.endpoint(id, "t", json!({})).await;
    assert_status!(
        s.manage(Method::POST, "/plugin/t", Some(json!({"cmd": "restart"})))
            .await,
        204
    );
    wait_plugin(&s, "t", "starting", |p| p["state"] == "starting").await;
    assert_status!(s.push(json!({"addr": a, "msg": "meanwhile"})).await, 202);
    s.endpoint_settles(id, ep, 1, 0).await;
    // The one try that was made, and only that, counts.
    assert_eq!(deliveries_tried(&s, 1), "1");
    assert_eq!(tries_counted(&s).await, [Some(1.0), Some(0.0), Some(0.0)]);
}

/// A plugin with no room for another call (`max-inflight` calls in
/// flight for longer than `timeout`) is busy, not failing: the events
/// that waited for room are sent once there is some, their attempts
/// unspent. Before, each spent an attempt, and with `max-attempts: 1`
/// failed for good with "too many calls in flight", never sent.
#[tokio::test]
async fn events_that_find_their_plugin_busy_are_sent_once_it_has_room() {
    let s = Server::start_with(ServerOptions {
        plugins_yaml: entry("t", "normal", "  max-inflight: 1\n"),
        yaml: "delivery:\n  max-attempts: 1\n  retry-base: 0.2\n".into(),
        ..Default::default()
    })
    .await;
    let (id, a) = s.new_addr().await;
    // Each send takes 1.8 s and the server's `timeout` is 2 s: the third
    // waits for room past its timeout, behind the first two.
    let ep = s.endpoint(id, "t", json!({"slow": 1800})).await;
    let pushes = (0..3).map(|i| s.push(json!({"addr": a, "msg": format!("m{i}")})));
    for r in futures_util::future::join_all(pushes).await {
        assert_status!(r, 202);
    }
    s.endpoint_settles(id, ep, 3, 0).await;
    assert_eq!(deliveries_tried(&s, 1), "3");
    assert_eq!(tries_counted(&s).await, [Some(3.0), Some(0.0), Some(0.0)]);
}

/// A restart by hand (the `restart` command) lets the calls in flight
/// finish before it stops the process: a delivery being made then is
/// made once, its outcome its own, and one pushed meanwhile waits for
/// the new process, its attempts unspent. Before, the process was killed
/// under the call, which failed ("connection closed during send"),
/// spent an attempt, and was made again by the new process.
#[tokio::test]
async fn a_restart_by_hand_lets_the_calls_in_flight_finish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("rec.jsonl");
    let s = Server::start_with(ServerOptions::recording_test_plugin(&record)).await;
    let (id, a) = s.new_addr().await;
    let ep = s.endpoint(id, "t", json!({"slow": 1500})).await;
    assert_status!(s.push(json!({"addr": a, "msg": "in flight"})).await, 202);
    roboger_tests::sends_begun(&record, 1).await;
    let old = plugin(&s, "t").await["pid"].clone();
    assert_status!(
        s.manage(Method::POST, "/plugin/t", Some(json!({"cmd": "restart"})))
            .await,
        204
    );
    assert_status!(s.push(json!({"addr": a, "msg": "meanwhile"})).await, 202);
    s.endpoint_settles(id, ep, 2, 0).await;
    let sent = roboger_tests::plugin_calls(&record, "send");
    let log = s.log_text();
    assert_eq!(sent.len(), 2, "{sent:?}\n{log}");
    assert_eq!(sent[0]["pid"], old, "{sent:?}");
    wait_plugin(&s, "t", "restarted", |p| p["pid"] != old).await;
    // Each one try, which worked.
    let clean = "SELECT count(*) FROM delivery WHERE attempts = 1 AND last_error IS NULL";
    assert_eq!(s.db_client().query(clean), "2", "{log}");
}

/// An endpoint's state through the API, once its `last_error` holds
/// `text` (within 15 s).
async fn endpoint_said(s: &Server, id: i64, ep: i64, text: &str) -> Value {
    poll_until(Duration::from_secs(15), async || {
        let v = s
            .manage(Method::GET, &format!("/addr/{id}/endpoint/{ep}"), None)
            .await
            .json();
        match v["last_error"].as_str().is_some_and(|e| e.contains(text)) {
            true => Ok(v),
            false => Err(format!("endpoint {ep} never said \"{text}\": {v}")),
        }
    })
    .await
}

/// A server whose plugin `t` fails every send ("the target is down"),
/// its retries 0.1 s apart at first (`delivery` also holds `more`), and
/// an event pushed to one endpoint: the server, the address's id and the
/// endpoint's.
async fn failing_target(record: &std::path::Path, more: &str) -> (Server, i64, i64) {
    let s = Server::start_with(ServerOptions {
        yaml: format!("delivery:\n  retry-base: 0.1\n  {more}\n"),
        ..ServerOptions::recording_test_plugin(record)
    })
    .await;
    let (id, a) = s.new_addr().await;
    let ep = s
        .endpoint(id, "t", json!({"fail": "the target is down"}))
        .await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    (s, id, ep)
}

/// Disables (0) or enables (1) what `path` names, an address or an
/// endpoint.
async fn set_active(s: &Server, path: &str, active: u8) {
    let r = s
        .manage(Method::PATCH, path, Some(json!({"active": active})))
        .await;
    assert_status!(r, 200);
}

/// When an endpoint's `last_error` was written.
fn said_at(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v["last_error_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.to_utc())
        .unwrap_or_else(|| panic!("no last_error_at: {v}"))
}

/// A disabled endpoint, or an endpoint of a disabled address, is sent
/// nothing: its pending deliveries (here the retries of a target that
/// fails) are looked at and put off, their attempts unspent, saying
/// why, and go on once it is enabled again. Before, disabling only kept
/// new events from it: the retries of those already pushed went on
/// being sent to the target, until their attempts were spent.
#[tokio::test]
async fn a_disabled_endpoint_or_address_is_sent_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("rec.jsonl");
    let (s, id, ep) = failing_target(&record, "retry-max: 1").await;
    let sends = || roboger_tests::plugin_calls(&record, "send").len();
    for (path, disabled) in [
        (
            format!("/addr/{id}/endpoint/{ep}"),
            format!("not tried: endpoint {ep} is disabled"),
        ),
        (
            format!("/addr/{id}"),
            format!("not tried: its address (addr {id}) is disabled"),
        ),
    ] {
        // The target fails, and the delivery is tried again and again.
        let before = sends();
        poll_until(Duration::from_secs(15), async || match sends() {
            n if n >= before + 2 => Ok(()),
            n => Err(format!("{n} sends, not {before} and 2 more")),
        })
        .await;
        set_active(&s, &path, 0).await;
        let first = endpoint_said(&s, id, ep, &disabled).await;
        let sent = sends();
        // Looked at twice more since (each within `retry-max`, 1 s), and
        // still not sent.
        let later = poll_until(Duration::from_secs(15), async || {
            let v = endpoint_said(&s, id, ep, &disabled).await;
            match said_at(&v) - said_at(&first) {
                d if d >= chrono::Duration::milliseconds(1500) => Ok(v),
                _ => Err(format!("not looked at again: {v}")),
            }
        })
        .await;
        assert_eq!(sends(), sent, "sent while disabled: {later}");
        assert_eq!(later["pending"], 1, "{later}");
        assert_eq!(
            s.db_client()
                .query("SELECT count(*) FROM delivery WHERE attempts = 1"),
            "0",
            "its attempts unspent"
        );
        set_active(&s, &path, 1).await;
        endpoint_said(&s, id, ep, "the target is down").await;
        assert!(sends() > sent);
    }
}

/// Enabling an endpoint, or its address, again makes its deliveries due
/// at once, not when they were next to be looked at (up to a minute
/// later); and one still disabled when `max-age` ends fails then, saying
/// so, though it was put off for longer.
#[tokio::test]
async fn a_disabled_endpoints_deliveries_go_once_it_is_enabled_until_max_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("rec.jsonl");
    let (s, id, ep) = failing_target(&record, "max-age: 12").await;
    let path = format!("/addr/{id}/endpoint/{ep}");
    let sends = || roboger_tests::plugin_calls(&record, "send").len();
    let disabled = format!("not tried: endpoint {ep} is disabled");
    for (what, said) in [
        (path.clone(), disabled.clone()),
        (
            format!("/addr/{id}"),
            format!("not tried: its address (addr {id}) is disabled"),
        ),
    ] {
        endpoint_said(&s, id, ep, "the target is down").await;
        set_active(&s, &what, 0).await;
        endpoint_said(&s, id, ep, &said).await;
        let sent = sends();
        set_active(&s, &what, 1).await;
        // Put off for 48 to 60 s, it is sent within a few.
        poll_until(Duration::from_secs(5), async || match sends() {
            n if n > sent => Ok(()),
            n => Err(format!("{what}: not sent again once enabled: {n} sends")),
        })
        .await;
    }
    endpoint_said(&s, id, ep, "the target is down").await;
    set_active(&s, &path, 0).await;
    endpoint_said(&s, id, ep, &disabled).await;
    let sent = sends();
    s.endpoint_settles(id, ep, 0, 1).await;
    let v = endpoint_said(&s, id, ep, "delivery.max-age has passed").await;
    assert!(
        v["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&disabled)),
        "{v}"
    );
    assert_eq!(sends(), sent);
    let tried = u32::try_from(sent).expect("a count");
    assert_eq!(deliveries_tried(&s, tried), "1", "its attempts unspent");
    assert_eq!(
        tries_counted(&s).await,
        [Some(0.0), Some(f64::from(tried)), Some(1.0)]
    );
}

/// Deleting an endpoint, or its address, while one of its deliveries is
/// being made: the send ends, its outcome finds the delivery gone, and
/// the log says so. Before, each such deletion logged a warning that the
/// deliveries whose outcomes were dropped "are made again", which these
/// are not: an operator looking for duplicates was sent the wrong way.
#[tokio::test]
async fn deleting_what_is_being_delivered_is_not_said_to_make_it_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("rec.jsonl");
    let s = Server::start_with(ServerOptions::recording_test_plugin(&record)).await;
    for (n, what) in [(1, "endpoint"), (2, "address")] {
        let (id, a) = s.new_addr().await;
        let ep = s.endpoint(id, "t", json!({"slow": 1500})).await;
        assert_status!(s.push(json!({"addr": a, "msg": what})).await, 202);
        roboger_tests::sends_begun(&record, n).await;
        let path = match what {
            "endpoint" => format!("/addr/{id}/endpoint/{ep}"),
            _ => format!("/addr/{id}"),
        };
        assert_status!(s.manage(Method::DELETE, &path, None).await, 204);
        poll_until(Duration::from_secs(15), async || {
            match s.log_lines("deliveries deleted meanwhile").len() {
                k if k >= n => Ok(()),
                _ => Err(format!(
                    "{what}: no outcome found its delivery gone\n{}",
                    s.log_text()
                )),
            }
        })
        .await;
    }
    let log = s.log_text();
    assert!(!log.contains("late outcomes dropped"), "{log}");
}
