//! `GET /metrics`: exact counts after known pushes and deliveries, read
//! from the server and through a real Prometheus server scraping it with
//! the master key as bearer token; who may read it; `promtool` accepts it.

use std::time::Duration;

use roboger_tests::{
    KEY, Method, PrometheusServer, Server, ServerOptions, assert_status, installed_program, json,
    poll_every,
};

/// How often the tests ask Prometheus again: it scrapes and evaluates
/// its rules once a second, so a look every 20 ms (`poll_until`'s) would
/// only load the cores the other suites share.
const PROMETHEUS_PACE: Duration = Duration::from_millis(200);

#[tokio::test]
async fn counts_pushes_and_deliveries_exactly_and_prometheus_reads_them() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let fresh = s.metrics().await;
    for status in [202, 400, 404, 406, 408, 413, 429, 503] {
        assert_eq!(
            fresh.get(&format!("roboger_push_total{{status=\"{status}\"}}")),
            Some(&0.0),
            "every push status is there from the start: {fresh:#?}"
        );
    }
    assert_eq!(fresh.get("roboger_plugin_up{plugin=\"t\"}"), Some(&1.0));
    assert!(fresh.contains_key("process_resident_memory_bytes"));
    assert!(fresh["roboger_plugin_resident_bytes{plugin=\"t\"}"] > 0.0);

    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({})).await;
    for i in 0..5 {
        assert_status!(
            s.push(json!({"addr": a, "msg": format!("m{i}")})).await,
            202
        );
    }
    for _ in 0..2 {
        assert_status!(s.push(json!({"addr": "nobody", "msg": "m"})).await, 404);
    }
    assert_status!(s.push(json!({"msg": "no address"})).await, 400);

    let m = s
        .metric_reaches(
            "roboger_deliveries_total{outcome=\"delivered\",plugin=\"t\"}",
            5.0,
        )
        .await;
    let at = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    assert_eq!(at("roboger_push_total{status=\"202\"}"), 5.0);
    assert_eq!(at("roboger_push_total{status=\"404\"}"), 2.0);
    assert_eq!(at("roboger_push_total{status=\"400\"}"), 1.0);
    assert_eq!(at("roboger_push_seconds_count"), 8.0);
    assert_eq!(
        at("roboger_commit_batch_size_sum"),
        5.0,
        "five events stored"
    );
    assert_eq!(
        at("roboger_delivery_attempt_seconds_count{plugin=\"t\"}"),
        5.0
    );
    assert_eq!(
        at("roboger_plugin_call_events_sum{plugin=\"t\"}"),
        5.0,
        "every event carried by one call or another"
    );
    assert_eq!(at("roboger_routing_addresses"), 1.0);
    // There from the start, at 0, as the push statuses are.
    assert_eq!(
        at("roboger_deliveries_total{outcome=\"failed\",plugin=\"t\"}"),
        0.0
    );
    assert_eq!(at("roboger_deliveries_held_total{plugin=\"t\"}"), 0.0);
    assert!(!m.keys().any(|k| k.contains(&a)), "no address in a label");
    // Counted in the database, refreshed every few seconds.
    s.metric_reaches("roboger_deliveries_pending{plugin=\"t\"}", 0.0)
        .await;

    let target = s.base.trim_start_matches("http://");
    let Some(prom) = PrometheusServer::start(target, KEY).await else {
        return;
    };
    let queries = [
        ("roboger_push_total{status=\"202\"}", 5.0),
        ("roboger_push_total{status=\"404\"}", 2.0),
        (
            "roboger_deliveries_total{plugin=\"t\",outcome=\"delivered\"}",
            5.0,
        ),
        ("up{job=\"roboger\"}", 1.0),
    ];
    poll_every(PROMETHEUS_PACE, Duration::from_secs(30), async || {
        let mut got = Vec::new();
        for (q, _) in queries {
            got.push(prom.query(q).await);
        }
        match queries
            .iter()
            .zip(&got)
            .all(|((_, want), g)| *g == Some(*want))
        {
            true => Ok(()),
            false => Err(format!("Prometheus answered {got:?} for {queries:?}")),
        }
    })
    .await;
}

/// `process_cpu_seconds_total` is the CPU time the server has used, to
/// the kernel's tick. It counted whole seconds: a server that had used
/// 0.4 s said 0, and a rate over a minute moved by whole seconds at once.
#[tokio::test]
async fn process_cpu_seconds_are_counted_to_the_tick() {
    let s = Server::start_with(ServerOptions::default()).await;
    let used = || -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.pid())).expect("stat");
        let after_name = &stat[stat.rfind(')').expect("a command name") + 1..];
        let ticks: u64 = after_name
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|t| t.parse::<u64>().expect("a tick count"))
            .sum();
        ticks as f64 / rustix::param::clock_ticks_per_second() as f64
    };
    let before = used();
    let said = s.metrics().await["process_cpu_seconds_total"];
    let after = used();
    assert!(
        before <= said && said <= after,
        "{before} s used before the scrape, {said} said, {after} after"
    );
}

#[tokio::test]
async fn only_the_master_key_or_metrics_allow_may_read_it() {
    let s = Server::start().await;
    let get = |headers: Vec<(&'static str, String)>| {
        let s = &s;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            s.request(Method::GET, "/metrics", None, &h, None).await
        }
    };
    assert_status!(get(vec![]).await, 401);
    assert_status!(
        get(vec![("Authorization", "Bearer wrong".into())]).await,
        403
    );
    assert_status!(get(vec![("X-Auth-Key", "wrong".into())]).await, 403);
    assert_status!(
        get(vec![("Authorization", format!("Bearer {KEY}"))]).await,
        200
    );
    let r = get(vec![("X-Auth-Key", KEY.into())]).await;
    assert_status!(r, 200);
    assert!(r.text.contains("# TYPE roboger_push_seconds histogram"));
    // The two wrong keys are counted, for an alert on guessing.
    let m = s.metrics().await;
    assert_eq!(
        m.get("roboger_management_refused_total{reason=\"wrong_key\"}"),
        Some(&2.0),
        "{m:#?}"
    );
    assert_eq!(
        m.get("roboger_management_refused_total{reason=\"not_allowed\"}"),
        Some(&0.0)
    );

    // Served to metrics.allow without a key; elsewhere a key is needed.
    let open = Server::start_with(ServerOptions {
        yaml: "metrics:\n  allow: ['127.0.0.0/8']\n".into(),
        ..Default::default()
    })
    .await;
    assert_status!(
        open.request(Method::GET, "/metrics", None, &[], None).await,
        200
    );
    // A management request from outside master.allow is counted too.
    let fenced = Server::start_with(ServerOptions {
        yaml: "metrics:\n  allow: ['127.0.0.0/8']\n".into(),
        master_yaml: "allow: ['10.0.0.0/8']\n".into(),
        ..Default::default()
    })
    .await;
    assert_status!(
        fenced
            .request(Method::GET, "/manage/v2/core", Some(KEY), &[], None)
            .await,
        403
    );
    let text = fenced
        .request(Method::GET, "/metrics", None, &[], None)
        .await
        .text;
    assert!(
        text.contains("roboger_management_refused_total{reason=\"not_allowed\"} 1\n"),
        "{text}"
    );
    let other = Server::start_with(ServerOptions {
        yaml: "metrics:\n  allow: ['10.0.0.0/8']\n".into(),
        ..Default::default()
    })
    .await;
    assert_status!(
        other
            .request(Method::GET, "/metrics", None, &[], None)
            .await,
        401
    );
}

#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({})).await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    s.wait_settled(id).await;
    let text = s
        .request(Method::GET, "/metrics", Some(KEY), &[], None)
        .await
        .text;
    let Some(promtool) = installed_program("ROBOGER_TEST_PROMTOOL", "promtool") else {
        return;
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The alert rules README.md offers ("Alerts"), as an operator copies them.
fn readme_rules() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(path).expect("read README.md");
    let (_, alerts) = readme
        .split_once("\n### Alerts\n")
        .expect("README.md has an Alerts section");
    let (_, block) = alerts.split_once("```yaml\n").expect("with a YAML block");
    let (rules, _) = block.split_once("```").expect("closed");
    rules.to_string()
}

/// `promtool` accepts the README's alert rules, and each fires on the
/// series `tests/prometheus/alerts_test.yml` gives it and not on the
/// others.
#[test]
fn promtool_checks_and_tests_the_readmes_alert_rules() {
    let Some(promtool) = installed_program("ROBOGER_TEST_PROMTOOL", "promtool") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("roboger.rules.yml"), readme_rules()).expect("write rules");
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus/alerts_test.yml");
    std::fs::copy(tests, dir.path().join("alerts_test.yml")).expect("copy the rules' tests");
    for args in [
        ["check", "rules", "roboger.rules.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Loaded into a real Prometheus scraping a real server, the README's
/// rules evaluate without error, every series they name is one the
/// server serves, and deliveries that fail for good raise
/// RobogerDeliveriesFailed for their plugin (whose counter was there at 0
/// before the first failure, so increase() sees it).
#[tokio::test]
async fn the_readmes_alert_rules_fire_on_a_real_servers_failures() {
    let s = Server::start_with(ServerOptions::test_plugin("delivery:\n  max-attempts: 1\n")).await;
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({"fail": "down"})).await;
    s.endpoint(id, "t", json!({"later": 30})).await;
    let rules = readme_rules();
    let target = s.base.trim_start_matches("http://");
    let Some(prom) = PrometheusServer::with_rules(target, KEY, Some(&rules)).await else {
        return;
    };
    let failed = "roboger_deliveries_total{outcome=\"failed\",plugin=\"t\"}";
    poll_every(
        PROMETHEUS_PACE,
        Duration::from_secs(30),
        async || match prom.query(failed).await {
            Some(0.0) => Ok(()),
            _ => Err(format!("Prometheus never read {failed} at 0")),
        },
    )
    .await;
    assert_status!(s.push(json!({"addr": a, "msg": "one"})).await, 202);
    s.metric_reaches(failed, 2.0).await;
    // The endpoint that asked for a wait is held: the second event is put
    // off for it, not sent.
    assert_status!(s.push(json!({"addr": a, "msg": "two"})).await, 202);
    s.metric_reaches("roboger_deliveries_held_total{plugin=\"t\"}", 1.0)
        .await;
    let m = s.metric_reaches(failed, 3.0).await;

    let mut named: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("roboger_"))
        .collect();
    named.sort_unstable();
    named.dedup();
    assert!(named.len() >= 8, "{named:?}");
    for name in named {
        // Measured against a database server's clock; cluster.rs reads it.
        if name == "roboger_clock_offset_seconds" {
            continue;
        }
        assert!(
            m.keys()
                .any(|k| k == name || k.starts_with(&format!("{name}{{"))),
            "the rules name {name}, which the server does not serve: {m:#?}"
        );
    }

    let written = rules.matches("- alert: ").count();
    let alerts = poll_every(PROMETHEUS_PACE, Duration::from_secs(30), async || {
        let alerts = prom.alerts().await;
        let rules = prom.rules().await;
        let has = |alert: &str, want: &str| {
            alerts.iter().any(|(name, labels, state)| {
                name == alert && *labels == json!({"plugin": "t"}) && state == want
            })
        };
        // The wait asked for shows too, pending for its 30 min.
        let seen = has("RobogerDeliveriesFailed", "firing")
            && has("RobogerTargetsAskingToWait", "pending");
        let evaluated = rules.len() == written && rules.iter().all(|(_, health, _)| health == "ok");
        match seen && evaluated {
            true => Ok(alerts),
            false => Err(format!("alerts {alerts:?}, rules {rules:?}")),
        }
    })
    .await;
    // Nothing else is wrong with this server.
    assert_eq!(alerts.len(), 2, "{alerts:?}");
}
