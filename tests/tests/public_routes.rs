//! Public routes backed by plugins: bucket objects a plugin stored, served
//! at `/file/{id}` with the original's headers, and `/plugin/{name}/...`
//! answered by the plugin's `http` method.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use roboger_tests::{
    Method, Server, ServerOptions, Value, assert_status, clock_set, json, on_mysql, poll_until,
    test_plugin_bin,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn entry(name: &str, rec: &Path, extra_env: &str) -> String {
    format!(
        "- name: {name}\n  command: {}\n  env:\n    TEST_PLUGIN_RECORD: {}\n{extra_env}",
        test_plugin_bin().display(),
        rec.display()
    )
}

/// A server with the test plugin as `t` (and `yaml` in its settings),
/// recording its calls to the returned file in the returned directory,
/// and a new address's id.
async fn server_with_t(yaml: &str) -> (tempfile::TempDir, PathBuf, Server, i64) {
    server_with_t_in(
        ServerOptions {
            yaml: yaml.into(),
            ..Default::default()
        },
        "",
    )
    .await
}

/// [`server_with_t`], the server started with `opts` besides and the
/// plugin with `plugin_env` (lines of YAML under its `env:`).
async fn server_with_t_in(
    opts: ServerOptions,
    plugin_env: &str,
) -> (tempfile::TempDir, PathBuf, Server, i64) {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let s = Server::start_with(ServerOptions {
        plugins_yaml: entry("t", &rec, plugin_env),
        ..opts
    })
    .await;
    let (addr, _) = s.new_addr().await;
    (dir, rec, s, addr)
}

/// Has plugin `t` store an object (through its validate_config) and
/// returns the object id.
async fn put(s: &Server, rec: &Path, addr: i64, bucket: Value) -> String {
    let mut bucket = bucket;
    bucket["addr_id"] = json!(addr);
    let r = s
        .manage(
            Method::POST,
            &format!("/addr/{addr}/endpoint"),
            Some(json!({"plugin_name": "t", "config": {"bucket": bucket}})),
        )
        .await;
    assert_status!(r, 201);
    let text = std::fs::read_to_string(rec).unwrap();
    let last = text
        .lines()
        .rev()
        .find(|l| l.contains("\"bucket_put\""))
        .unwrap();
    serde_json::from_str::<Value>(last).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A client that asks for `path` and reads nothing of the answer (a
/// small receive window, so the kernel's buffers cannot take it all),
/// once the answer has begun: its room in the body budget is taken.
async fn reads_nothing_of(s: &Server, path: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let host = s.base.trim_start_matches("http://");
    let mut idle = sock.connect(host.parse().unwrap()).await.unwrap();
    idle.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Peeking at the first byte takes none of them.
    let mut first = [0u8; 1];
    idle.peek(&mut first).await.unwrap();
    idle
}

/// Asks for `path` until it is served (200), each other answer being
/// 503 for want of room, within `limit`.
async fn served_again(s: &Server, path: &str, limit: Duration) -> roboger_tests::Resp {
    poll_until(limit, async || {
        let r = s.request(Method::GET, path, None, &[], None).await;
        if r.status.as_u16() == 200 {
            return Ok(r);
        }
        assert_status!(r, 503);
        Err(format!("{path} was never served again"))
    })
    .await
}

#[tokio::test]
async fn public_bucket_objects_are_served_until_they_expire() {
    let (_dir, rec, s, addr) = server_with_t("").await;

    let id = put(
        &s,
        &rec,
        addr,
        json!({"content": "hello file", "public": true, "fname": "hello.txt", "expires": 60, "metadata": {"k": "v", "n": 5}}),
    )
    .await;
    assert_eq!(id.len(), 64);
    let r = s
        .request(Method::GET, &format!("/file/{id}"), None, &[], None)
        .await;
    assert_status!(r, 200);
    assert_eq!(r.text, "hello file");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.header("roboger-file-name"), Some("hello.txt"));
    assert_eq!(r.header("x-roboger-k"), Some("v"));
    assert_eq!(r.header("x-roboger-n"), Some("5"));
    let cc = r.header("cache-control").unwrap();
    let max_age: i64 = cc
        .strip_prefix("public, max-age=")
        .unwrap()
        .parse()
        .unwrap();
    assert!((55..=60).contains(&max_age), "{cc}");

    // An explicit mime type wins over detection. Every file is sent
    // sandboxed in an origin of its own and never sniffed (console.rs
    // opens one in a browser), but a PDF, whatever its parameters, which
    // Chromium's viewer will not show in a sandbox.
    for (mimetype, sandbox) in [
        ("text/csv", Some("sandbox")),
        ("application/pdf", None),
        ("Application/PDF; name=report.pdf", None),
    ] {
        let id = put(
            &s,
            &rec,
            addr,
            json!({"content": "a,b", "public": true, "mimetype": mimetype}),
        )
        .await;
        let r = s
            .request(Method::GET, &format!("/file/{id}"), None, &[], None)
            .await;
        assert_eq!(r.header("content-type"), Some(mimetype));
        assert_eq!(r.header("content-security-policy"), sandbox, "{mimetype}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }

    // Private, unknown and expired objects are 404.
    let private = put(
        &s,
        &rec,
        addr,
        json!({"content": "secret", "public": false}),
    )
    .await;
    assert_status!(
        s.request(Method::GET, &format!("/file/{private}"), None, &[], None)
            .await,
        404
    );
    assert_status!(
        s.request(
            Method::GET,
            &format!("/file/{}", "0".repeat(64)),
            None,
            &[],
            None
        )
        .await,
        404
    );
    let short = put(
        &s,
        &rec,
        addr,
        json!({"content": "brief", "public": true, "expires": 1}),
    )
    .await;
    assert_status!(
        s.request(Method::GET, &format!("/file/{short}"), None, &[], None)
            .await,
        200
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_status!(
        s.request(Method::GET, &format!("/file/{short}"), None, &[], None)
            .await,
        404
    );
    assert_status!(
        s.manage(Method::POST, "/core", Some(json!({"cmd": "cleanup"})))
            .await,
        204
    );

    // Deleting the address deletes its objects.
    assert_status!(
        s.manage(Method::DELETE, &format!("/addr/{addr}"), None)
            .await,
        204
    );
    assert_status!(
        s.request(Method::GET, &format!("/file/{id}"), None, &[], None)
            .await,
        404
    );
}

/// A plugin may keep an object for up to ten years; asking for longer
/// (`expires` as "forever") or for no time at all is refused, saying so,
/// where it made the server's call panic.
#[tokio::test]
async fn an_object_is_kept_at_most_ten_years() {
    let (_dir, rec, s, addr) = server_with_t("").await;
    const TEN_YEARS: i64 = 10 * 365 * 86_400;
    // From 2028-01-19, MySQL keeps no object ten years (see
    // `an_object_is_kept_past_2038_or_refused`): there, the longest it
    // keeps, less a day.
    let longest = if on_mysql() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        TEN_YEARS.min(i64::from(i32::MAX) - now - 86_400)
    } else {
        TEN_YEARS
    };
    let id = put(
        &s,
        &rec,
        addr,
        json!({"content": "long", "public": true, "expires": longest}),
    )
    .await;
    let r = s
        .request(Method::GET, &format!("/file/{id}"), None, &[], None)
        .await;
    assert_status!(r, 200);
    let cc = r.header("cache-control").unwrap_or_default().to_string();
    let max_age: i64 = cc
        .strip_prefix("public, max-age=")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{cc}"));
    assert!((longest - 5..=longest).contains(&max_age), "{cc}");
    for expires in [
        json!(TEN_YEARS + 1),
        json!(i64::MAX),
        json!(1u64 << 53),
        json!(0),
        json!(-1),
    ] {
        let config = json!({"bucket": {"content": "x", "addr_id": addr, "expires": expires}});
        let r = s
            .manage(
                Method::POST,
                &format!("/addr/{addr}/endpoint"),
                Some(json!({"plugin_name": "t", "config": config})),
            )
            .await;
        assert_status!(r, 400);
        assert!(
            r.text.contains(
                "expires must be a positive number of seconds, at most 315360000 (ten years)"
            ),
            "{expires}: {}",
            r.text
        );
    }
    let log = s.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

/// MySQL's `TIMESTAMP` ends at 2038-01-19 03:14:07 UTC. A server whose
/// clock reads 2030 keeps a bucket object ten years on SQLite and
/// PostgreSQL; on MySQL it refuses one that would outlive that, saying
/// so, where MariaDB stored the object already expired. The plugin's
/// clock is left alone: libfaketime cannot run in its sandbox.
#[tokio::test]
async fn an_object_is_kept_past_2038_or_refused() {
    let clock = tempfile::tempdir().unwrap();
    let offset = clock.path().join("clock-offset");
    std::fs::write(&offset, "@2030-01-01 00:00:00").unwrap();
    let (_dir, rec, s, addr) = server_with_t_in(
        ServerOptions {
            env: clock_set(&offset),
            ..Default::default()
        },
        "    LD_PRELOAD: ''\n",
    )
    .await;
    s.endpoint(addr, "t", json!({})).await;
    let a = s.manage(Method::GET, &format!("/addr/{addr}"), None).await;
    let r = s.push(json!({"addr": a.json()["a"], "msg": "later"})).await;
    assert_status!(r, 202);
    let (state, _, error) = s.settled_delivery(addr).await;
    assert_eq!(state, "delivered", "{error}");
    let event = s.newest_event(addr).await;
    let created = event["created"].as_str().unwrap_or_default();
    assert!(created.starts_with("2030-01-01T"), "{event}");

    const TEN_YEARS: i64 = 10 * 365 * 86_400;
    const FIVE_YEARS: i64 = TEN_YEARS / 2;
    let kept = |expires| json!({"content": "kept", "public": true, "expires": expires});
    if on_mysql() {
        let mut bucket = kept(TEN_YEARS);
        bucket["addr_id"] = json!(addr);
        let r = s.try_endpoint(addr, "t", json!({"bucket": bucket})).await;
        assert_status!(r, 400);
        assert!(r.text.contains("2038-01-19 03:14:07 UTC"), "{}", r.text);
    }
    let lifetime = if on_mysql() { FIVE_YEARS } else { TEN_YEARS };
    let id = put(&s, &rec, addr, kept(lifetime)).await;
    let r = s
        .request(Method::GET, &format!("/file/{id}"), None, &[], None)
        .await;
    assert_status!(r, 200);
    assert_eq!(r.text, "kept");
    let cc = r.header("cache-control").unwrap_or_default();
    let max_age: i64 = cc
        .strip_prefix("public, max-age=")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{cc}"));
    assert!((lifetime - 5..=lifetime).contains(&max_age), "{cc}");
}

#[tokio::test]
async fn files_nobody_reads_hold_neither_memory_nor_a_connection_for_long() {
    // 14 MiB of the 16 MiB budget is for large bodies and files: room
    // for one 10 MiB file at a time. The plugin call that stores the
    // 10 MiB object gets 5 s, not the tests' 2, on a loaded machine.
    let (_dir, rec, s, addr) = server_with_t("body-budget: 16777216\ntimeout: 5\n").await;
    const SIZE: usize = 10 * 1024 * 1024;
    let id = put(
        &s,
        &rec,
        addr,
        json!({"content": "0123456789abcdef", "repeat": SIZE / 16, "public": true, "expires": 600}),
    )
    .await;
    let path = format!("/file/{id}");

    let mut idle = reads_nothing_of(&s, &path).await;
    let began = Instant::now();

    // Meanwhile the file has no room: another client is told to come back.
    let r = s.request(Method::GET, &path, None, &[], None).await;
    assert_eq!(
        r.status.as_u16(),
        503,
        "a second copy of the file was sent while the first waited"
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.text.contains("body-budget"), "{}", r.text);

    // The idle client is disconnected once it has taken nothing for
    // 30 s; then the file is served whole again.
    let served = served_again(&s, &path, Duration::from_secs(90)).await;
    assert_eq!(served.text.len(), SIZE);
    assert!(served.text.starts_with("0123456789abcdef0123"));
    assert!(
        began.elapsed() > Duration::from_secs(20),
        "served again after {:?}",
        began.elapsed()
    );
    let mut got = Vec::new();
    let _ = idle.read_to_end(&mut got).await;
    assert!(
        got.len() < SIZE,
        "the idle client got all {} bytes",
        got.len()
    );
}

#[tokio::test]
async fn plugin_routes_reach_the_plugins_http_method() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(ServerOptions {
        yaml: "ip-header: X-Real-IP\n".into(),
        plugins_yaml: format!(
            "{}{}",
            entry("t", &dir.path().join("t.jsonl"), ""),
            entry(
                "quiet",
                &dir.path().join("q.jsonl"),
                "    TEST_PLUGIN_NO_HTTP: '1'\n"
            )
        ),
        ..Default::default()
    })
    .await;
    let r = s
        .request(
            Method::POST,
            "/plugin/t/hook/abc?x=1&y=2",
            None,
            &[("X-Real-IP", "10.1.2.3"), ("X-Custom", "c")],
            Some(json!({"hello": "plugin"})),
        )
        .await;
    assert_status!(r, 200);
    assert_eq!(r.header("x-test"), Some("yes"));
    let echo = r.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/hook/abc");
    assert_eq!(echo["query"], "x=1&y=2");
    assert_eq!(echo["headers"]["x-custom"], "c");
    assert_eq!(echo["client_ip"], "10.1.2.3");
    assert_eq!(
        serde_json::from_str::<Value>(echo["body"].as_str().unwrap()).unwrap(),
        json!({"hello": "plugin"})
    );

    let r = s
        .request(Method::GET, "/plugin/t/?status=418", None, &[], None)
        .await;
    assert_status!(r, 418);
    assert_eq!(r.json()["client_ip"], "127.0.0.1");

    assert_status!(
        s.request(Method::GET, "/plugin/nope/x", None, &[], None)
            .await,
        404
    );
    let r = s
        .request(Method::GET, "/plugin/quiet/x", None, &[], None)
        .await;
    assert_status!(r, 404);
    assert!(r.text.contains("no HTTP routes"), "{}", r.text);
    let big = "x".repeat(11 * 1024 * 1024);
    let r = s
        .http
        .post(s.url("/plugin/t/upload"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
}

#[tokio::test]
async fn plugin_answers_nobody_reads_hold_room_in_the_body_budget() {
    let dir = tempfile::tempdir().unwrap();
    // As for files above: room for one 10 MiB answer at a time.
    let s = Server::start_with(ServerOptions {
        yaml: "body-budget: 16777216\ntimeout: 5\n".into(),
        plugins_yaml: entry("t", &dir.path().join("t.jsonl"), ""),
        ..Default::default()
    })
    .await;
    const SIZE: usize = 10 * 1024 * 1024;
    let path = format!("/plugin/t/big?size={SIZE}");
    let idle = reads_nothing_of(&s, &path).await;

    // While it is held, a second such answer is not made: the client is
    // told to come back.
    let r = s.request(Method::GET, &path, None, &[], None).await;
    assert_eq!(
        r.status.as_u16(),
        503,
        "a second answer was sent while the first waited"
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    // /metrics shows the room held and the refusal.
    let m = s.metrics().await;
    assert!(
        m["roboger_body_budget_used_bytes{pool=\"large\"}"] >= SIZE as f64,
        "{m:#?}"
    );
    assert_eq!(
        m["roboger_body_budget_size_bytes{pool=\"large\"}"],
        14.0 * 1024.0 * 1024.0
    );
    assert_eq!(m["roboger_body_budget_refused_total{pool=\"large\"}"], 1.0);
    // Small answers take the other pool and are still served.
    assert_status!(
        s.request(Method::GET, "/plugin/t/small", None, &[], None)
            .await,
        200
    );

    // Once the idle client goes, its room is given back.
    drop(idle);
    let served = served_again(&s, &path, Duration::from_secs(20)).await;
    assert_eq!(served.text.len(), SIZE);
    assert_eq!(served.header("content-length"), Some("10485760"));
    assert_eq!(served.header("x-test"), Some("yes"));
    // Sent whole, it holds no room any more.
    assert_eq!(
        s.metrics().await["roboger_body_budget_used_bytes{pool=\"large\"}"],
        0.0
    );

    // An answer that has no body says so (no Content-Length on a 204),
    // and the connection carries the next request.
    let r = s
        .request(Method::GET, "/plugin/t/x?status=204", None, &[], None)
        .await;
    assert_status!(r, 204);
    assert_eq!(r.text, "");
    assert_eq!(r.header("content-length"), None);
    assert_status!(
        s.request(Method::GET, "/plugin/t/x", None, &[], None).await,
        200
    );
    // HEAD: the length the answer would have, and none of its body.
    let r = s
        .request(Method::HEAD, "/plugin/t/x?size=100", None, &[], None)
        .await;
    assert_status!(r, 200);
    assert_eq!(r.header("content-length"), Some("100"));
    assert_eq!(r.text, "");
    let r = s
        .request(Method::GET, "/plugin/t/x?size=100", None, &[], None)
        .await;
    assert_status!(r, 200);
    assert_eq!(r.text, "x".repeat(100));
}
