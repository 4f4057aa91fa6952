//! The management API end to end: the real server binary, every route and
//! every error status, over HTTP. Runs on SQLite, and on PostgreSQL when
//! `ROBOGER_TEST_PG` is set (tests/run does both).

use std::time::Duration;

use roboger_tests::{KEY, Method, Server, ServerOptions, Value, assert_status, at_once, json};

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PATCH: Method = Method::PATCH;
const DELETE: Method = Method::DELETE;

fn with_plugins() -> ServerOptions {
    ServerOptions {
        plugins: vec!["webhook".into(), "chain".into(), "email".into()],
        ..Default::default()
    }
}

/// Creates an address and returns (id, a).
async fn new_addr(s: &Server) -> (i64, String) {
    let r = s.manage(POST, "/addr", None).await;
    assert_status!(r, 201);
    let j = r.json();
    (
        j["id"].as_i64().unwrap(),
        j["a"].as_str().unwrap().to_string(),
    )
}

async fn new_endpoint(s: &Server, addr: i64) -> i64 {
    let r = s
        .manage(
            POST,
            &format!("/addr/{addr}/endpoint"),
            Some(json!({"plugin_name": "webhook", "config": {"url": "http://127.0.0.1:1/"}})),
        )
        .await;
    assert_status!(r, 201);
    r.json()["id"].as_i64().unwrap()
}

#[tokio::test]
async fn ping_and_core_info() {
    let s = Server::start().await;
    assert_status!(s.request(GET, "/ping", None, &[], None).await, 204);
    let r = s.manage(GET, "/core", None).await;
    assert_status!(r, 200);
    let j = r.json();
    assert_eq!(j["ok"], true);
    assert_eq!(j["master"], true);
    assert_eq!(j["version"], env!("CARGO_PKG_VERSION"));
    assert!(j.get("build").is_some());
    // Unknown routes are 404 with a text body.
    let r = s.request(GET, "/nowhere", None, &[], None).await;
    assert_status!(r, 404);
    assert!(!r.text.is_empty());
    let r = s.manage(GET, "/nothing/here", None).await;
    assert_status!(r, 404);
}

#[tokio::test]
async fn authentication() {
    let s = Server::start().await;
    let r = s.request(GET, "/manage/v2/core", None, &[], None).await;
    assert_status!(r, 401);
    assert!(r.text.contains("X-Auth-Key"), "{}", r.text);
    assert_status!(
        s.request(GET, "/manage/v2/addr", Some("wrong"), &[], None)
            .await,
        403
    );
    assert_status!(
        s.request(GET, "/manage/v2/addr", Some(""), &[], None).await,
        403
    );
    // The key may come as the body field k instead of the header.
    let r = s
        .request(
            POST,
            "/manage/v2/addr",
            None,
            &[("Accept", "*/*")],
            Some(json!({"k": KEY})),
        )
        .await;
    assert_status!(r, 201);
    let r = s
        .request(
            POST,
            "/manage/v2/addr",
            None,
            &[],
            Some(json!({"k": "nope"})),
        )
        .await;
    assert_status!(r, 403);
}

/// The master key from `addr`'s door: a management request, with `key`.
async fn addr_list(s: &Server, key: &str) -> roboger_tests::Resp {
    s.request(GET, "/manage/v2/addr", Some(key), &[], None)
        .await
}

#[tokio::test]
async fn wrong_keys_make_their_address_wait_on_the_api_metrics_and_console() {
    let s = Server::start().await;
    for _ in 0..3 {
        assert_status!(addr_list(&s, "guess").await, 403);
    }
    // Now the right key waits too, so a right guess is not told apart.
    let r = addr_list(&s, KEY).await;
    assert_status!(r, 429);
    assert!(r.text.contains("too many wrong master keys"), "{}", r.text);
    let wait: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=60).contains(&wait), "Retry-After: {wait}");
    // The same count holds at every door to the key.
    let bearer = format!("Bearer {KEY}");
    let r = s
        .request(GET, "/metrics", None, &[("Authorization", &bearer)], None)
        .await;
    assert_status!(r, 429);
    let r = s
        .http
        .post(s.url("/ui/signin"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("key={KEY}"))
        .send()
        .await
        .expect("POST /ui/signin");
    assert_eq!(r.status(), 429);
    let page = r.text().await.unwrap_or_default();
    assert!(
        page.contains("Too many wrong keys from your address"),
        "{page}"
    );
    // After the wait the right key gets in, and the count starts again:
    // two more wrong keys are only refused.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = addr_list(&s, KEY).await;
        if r.status == 200 {
            break;
        }
        assert_status!(r, 429);
        assert!(std::time::Instant::now() < end, "still waiting: {}", r.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..2 {
        assert_status!(addr_list(&s, "guess").await, 403);
    }
    assert_status!(addr_list(&s, KEY).await, 200);
    let m = s.metrics().await;
    assert_eq!(
        m.get("roboger_management_refused_total{reason=\"wrong_key\"}"),
        Some(&5.0)
    );
    let waited = m
        .get("roboger_management_refused_total{reason=\"waiting\"}")
        .copied()
        .unwrap_or_default();
    assert!(waited >= 3.0, "429s counted: {waited}");
}

#[tokio::test]
async fn wrong_keys_sent_at_once_after_one_are_weighed_one_by_one() {
    // Once an address has a wrong key counted, a guesser sending many at
    // once gets no more tries than one sending them in turn: two more
    // refused (three in all), then each must wait.
    let s = Server::start().await;
    assert_status!(addr_list(&s, "guess").await, 403);
    let attempts = (0..24).map(|i| {
        let s = &s;
        async move { addr_list(s, &format!("guess-{i}")).await.status.as_u16() }
    });
    let statuses = futures_util::future::join_all(attempts).await;
    let refused = statuses.iter().filter(|s| **s == 403).count();
    let waiting = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        refused, 2,
        "keys checked out of 24 sent at once: {statuses:?}"
    );
    assert_eq!(refused + waiting, 24, "{statuses:?}");
}

/// A server behind a proxy that names the client (`ip-header`), as in
/// production; here the header is believed from every client.
async fn behind_a_proxy() -> Server {
    Server::start_with(ServerOptions {
        yaml: "ip-header: X-Real-IP\n".into(),
        ..Default::default()
    })
    .await
}

/// The status of a management request with `key` from the client the
/// proxy names `ip`.
async fn key_from(s: &Server, ip: &str, key: &str) -> u16 {
    s.request(
        GET,
        "/manage/v2/core",
        Some(key),
        &[("X-Real-IP", ip)],
        None,
    )
    .await
    .status
    .as_u16()
}

#[tokio::test]
async fn an_ipv6_guesser_gains_nothing_from_fresh_addresses_in_its_64() {
    let s = behind_a_proxy().await;
    for ip in ["2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:1:ffff::3"] {
        assert_eq!(key_from(&s, ip, "guess").await, 403);
    }
    assert_eq!(key_from(&s, "2001:db8:0:1::4", KEY).await, 429);
    // Another /64, and an IPv4 client, are not held back by it.
    assert_eq!(key_from(&s, "2001:db8:0:2::1", KEY).await, 200);
    assert_eq!(key_from(&s, "192.0.2.1", KEY).await, 200);
}

/// A client that may name its own address (here `ip-header` believed
/// from every client; in production also an IPv6 network wider than the
/// /64 counted) sends each wrong key from a fresh /64. Each address's
/// wrong keys are kept a day, so the table of them would grow with every
/// request; it is trimmed to the 10,000 that count most (and 1,000 more
/// counted since), and a guesser held back stays held back.
#[tokio::test]
async fn wrong_keys_from_ever_fresh_addresses_leave_a_bounded_table() {
    let s = behind_a_proxy().await;
    let guesser = || key_from(&s, "192.0.2.1", "guess");
    for _ in 0..3 {
        assert_eq!(guesser().await, 403);
    }
    let fresh = 12_000u32;
    let addresses: Vec<String> = (0..fresh)
        .map(|i| format!("2001:db8:{:x}:{:x}::1", i >> 16, i & 0xffff))
        .collect();
    let from_fresh = addresses.iter().map(|ip| key_from(&s, ip, "guess"));
    let statuses = at_once(from_fresh, 16).await;
    assert!(statuses.iter().all(|&st| st == 403), "{statuses:?}");
    let rows: u64 = s
        .db_client()
        .query("SELECT COUNT(*) FROM console_signin")
        .parse()
        .expect("a count");
    assert!(
        (10_000..=11_000).contains(&rows),
        "{rows} addresses' wrong keys kept after {} counted",
        fresh + 1
    );
    // The guesser's count was kept: its next wrong key is its fourth,
    // after which it waits.
    assert_eq!(guesser().await, 403);
    assert_eq!(guesser().await, 429);
}

#[tokio::test]
async fn with_slow_down_off_every_key_is_checked() {
    let s = Server::start_with(ServerOptions {
        master_yaml: "slow-down: false\n".into(),
        ..Default::default()
    })
    .await;
    for _ in 0..5 {
        assert_status!(addr_list(&s, "guess").await, 403);
    }
    assert_status!(addr_list(&s, KEY).await, 200);
}

#[tokio::test]
async fn core_commands() {
    let s = Server::start().await;
    new_addr(&s).await;
    for cmd in ["cleanup", "reset-addr-limits"] {
        assert_status!(
            s.manage(POST, "/core", Some(json!({"cmd": cmd}))).await,
            204
        );
    }
    assert_status!(
        s.manage(POST, "/core", Some(json!({"cmd": "reboot"})))
            .await,
        405
    );
    assert_status!(s.manage(POST, "/core", Some(json!({}))).await, 400);
    assert_status!(
        s.manage(POST, "/core", Some(json!({"cmd": "cleanup", "x": 1})))
            .await,
        400
    );
    assert_status!(
        s.manage(POST, "/core", Some(json!({"cmd": "delete-everything"})))
            .await,
        204
    );
    assert_eq!(s.manage(GET, "/addr", None).await.json(), json!([]));
    // A wrong method on a known path is 405.
    assert_status!(s.manage(DELETE, "/core", None).await, 405);
}

#[tokio::test]
async fn plugin_list_is_sorted_with_the_original_fields() {
    let s = Server::start_with(with_plugins()).await;
    let r = s.manage(GET, "/plugin", None).await;
    assert_status!(r, 200);
    let list = r.json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["plugin_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["chain", "email", "webhook"]);
    for p in list.as_array().unwrap() {
        for f in ["version", "description", "url"] {
            assert!(p.get(f).is_some(), "{p} lacks {f}");
        }
    }
}

#[tokio::test]
async fn addr_lifecycle() {
    let s = Server::start().await;
    let r = s.manage(POST, "/addr", None).await;
    assert_status!(r, 201);
    let a = r.json();
    let (id, addr) = (
        a["id"].as_i64().unwrap(),
        a["a"].as_str().unwrap().to_string(),
    );
    assert_eq!(addr.len(), 64);
    assert!(addr.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(a["active"], 1);
    assert!(a.get("lim_c").is_none(), "no limits configured: {a}");
    assert_eq!(
        r.header("location").unwrap(),
        format!("/manage/v2/addr/{addr}")
    );

    // Without a matching Accept the created resource is not sent.
    let r = s
        .request(
            POST,
            "/manage/v2/addr",
            Some(KEY),
            &[("Accept", "text/html")],
            None,
        )
        .await;
    assert_status!(r, 201);
    assert!(r.text.is_empty());
    assert!(r.header("location").is_some());
    let r = s
        .request(
            POST,
            "/manage/v2/addr",
            Some(KEY),
            &[("Accept", "application/roboger.addr+json")],
            None,
        )
        .await;
    assert_eq!(r.json()["active"], 1);
    let r = s
        .request(
            POST,
            "/manage/v2/addr",
            Some(KEY),
            &[("Accept", "application/*")],
            None,
        )
        .await;
    assert_eq!(r.json()["active"], 1);

    // Get by id and by address; list by id.
    assert_eq!(s.manage(GET, &format!("/addr/{id}"), None).await.json(), a);
    assert_eq!(
        s.manage(GET, &format!("/addr/{addr}"), None).await.json(),
        a
    );
    let list = s.manage(GET, "/addr", None).await.json();
    assert_eq!(list.as_array().unwrap().len(), 4);
    assert_eq!(list[0], a);

    // PATCH: disable, 204 without Accept, null means unchanged.
    let r = s
        .manage(PATCH, &format!("/addr/{id}"), Some(json!({"active": 0})))
        .await;
    assert_status!(r, 200);
    assert_eq!(r.json()["active"], 0);
    let r = s
        .request(
            PATCH,
            &format!("/manage/v2/addr/{id}"),
            Some(KEY),
            &[("Accept", "text/plain")],
            Some(json!({"active": 1})),
        )
        .await;
    assert_status!(r, 204);
    let r = s
        .manage(
            PATCH,
            &format!("/addr/{id}"),
            Some(json!({"active": null, "lim_c": 7})),
        )
        .await;
    assert_status!(r, 200);
    assert_eq!(r.json()["active"], 1);
    assert_status!(
        s.manage(PATCH, &format!("/addr/{id}"), Some(json!({"lim_s": 5})))
            .await,
        200
    );
    // Bad input: unknown field, protected field, wrong types.
    let r = s
        .manage(PATCH, &format!("/addr/{id}"), Some(json!({"colour": 1})))
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("colour"), "{}", r.text);
    let r = s
        .manage(PATCH, &format!("/addr/{id}"), Some(json!({"a": "x"})))
        .await;
    assert_status!(r, 405);
    assert!(r.text.contains("protected"));
    assert_status!(
        s.manage(PATCH, &format!("/addr/{id}"), Some(json!({"id": 9})))
            .await,
        405
    );
    assert_status!(
        s.manage(
            PATCH,
            &format!("/addr/{id}"),
            Some(json!({"active": "yes"}))
        )
        .await,
        400
    );
    assert_status!(
        s.manage(PATCH, &format!("/addr/{id}"), Some(json!({"lim_c": -3})))
            .await,
        400
    );
    assert_status!(
        s.manage(PATCH, &format!("/addr/{id}"), Some(json!({"lim_c": 1.5})))
            .await,
        400
    );
    let r = s
        .request(
            PATCH,
            &format!("/manage/v2/addr/{id}"),
            Some(KEY),
            &[("Content-Type", "application/json")],
            None,
        )
        .await;
    assert!(r.status.is_success());
    let r = s
        .http
        .patch(s.url(&format!("/manage/v2/addr/{id}")))
        .header("X-Auth-Key", KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = s
        .manage(PATCH, &format!("/addr/{id}"), Some(json!([1, 2])))
        .await;
    assert_status!(r, 400);

    // Missing addresses.
    assert_status!(s.manage(GET, "/addr/999999", None).await, 404);
    assert_status!(
        s.manage(GET, &format!("/addr/{}", "z".repeat(64)), None)
            .await,
        404
    );
    assert_status!(
        s.manage(PATCH, "/addr/999999", Some(json!({"active": 1})))
            .await,
        404
    );
    assert_status!(s.manage(DELETE, "/addr/999999", None).await, 404);

    // Delete.
    assert_status!(s.manage(DELETE, &format!("/addr/{addr}"), None).await, 204);
    assert_status!(s.manage(GET, &format!("/addr/{id}"), None).await, 404);
}

#[tokio::test]
async fn addr_change() {
    let s = Server::start().await;
    let (id, old) = new_addr(&s).await;
    let (_, other) = new_addr(&s).await;
    let r = s
        .manage(
            POST,
            &format!("/addr/{id}"),
            Some(json!({"cmd": "change", "to": null})),
        )
        .await;
    assert_status!(r, 301);
    assert!(r.text.is_empty());
    let loc = r.header("location").unwrap().to_string();
    let new = loc.strip_prefix("/manage/v2/addr/").unwrap().to_string();
    assert_eq!(new.len(), 64);
    assert_ne!(new, old);
    let r = s.request(GET, &loc, Some(KEY), &[], None).await;
    assert_eq!(r.json()["a"], new);
    assert_eq!(r.json()["id"], id);
    assert_status!(s.manage(GET, &format!("/addr/{old}"), None).await, 404);

    let mine = "m".repeat(64);
    let r = s
        .manage(
            POST,
            &format!("/addr/{new}"),
            Some(json!({"cmd": "change", "to": mine})),
        )
        .await;
    assert_status!(r, 301);
    assert_eq!(
        r.header("location").unwrap(),
        format!("/manage/v2/addr/{mine}")
    );
    // Taken, wrong length, unsafe characters, unknown command, missing.
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{id}"),
            Some(json!({"cmd": "change", "to": other}))
        )
        .await,
        409
    );
    let r = s
        .manage(
            POST,
            &format!("/addr/{id}"),
            Some(json!({"cmd": "change", "to": "short"})),
        )
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("64"));
    let slashy = format!("{}/", "a".repeat(63));
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{id}"),
            Some(json!({"cmd": "change", "to": slashy}))
        )
        .await,
        400
    );
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{id}"),
            Some(json!({"cmd": "explode"}))
        )
        .await,
        405
    );
    assert_status!(
        s.manage(POST, &format!("/addr/{id}"), Some(json!({"to": null})))
            .await,
        400
    );
    assert_status!(
        s.manage(POST, "/addr/424242", Some(json!({"cmd": "change"})))
            .await,
        404
    );
}

#[tokio::test]
async fn endpoints() {
    let s = Server::start_with(with_plugins()).await;
    let (id, a) = new_addr(&s).await;
    let (other_id, _) = new_addr(&s).await;

    let r = s
        .manage(POST, &format!("/addr/{a}/endpoint"), Some(json!({"plugin_name": "webhook", "config": {"url": "http://x/"}, "description": "hook"})))
        .await;
    assert_status!(r, 201);
    let ep = r.json();
    let ep_id = ep["id"].as_i64().unwrap();
    assert_eq!(
        r.header("location").unwrap(),
        format!("/manage/v2/addr/{a}/endpoint/{ep_id}")
    );
    assert_eq!(
        ep,
        json!({"id": ep_id, "addr_id": id, "plugin_name": "webhook", "config": {"url": "http://x/"}, "active": 1, "description": "hook"})
    );
    // robogerctl creates with a null description and an empty config.
    let r = s
        .manage(
            POST,
            &format!("/addr/{id}/endpoint"),
            Some(json!({"plugin_name": "email", "config": {}, "description": null})),
        )
        .await;
    assert_status!(r, 201);
    assert_eq!(r.json()["description"], json!(null));
    let r = s
        .manage(
            POST,
            &format!("/addr/{id}/endpoint"),
            Some(json!({"plugin_name": "chain"})),
        )
        .await;
    assert_eq!(r.json()["config"], json!({}));

    // Creation errors.
    let r = s
        .manage(
            POST,
            &format!("/addr/{id}/endpoint"),
            Some(json!({"plugin_name": "carrier-pigeon"})),
        )
        .await;
    assert_status!(r, 404);
    assert!(r.text.contains("carrier-pigeon"));
    assert_status!(
        s.manage(
            POST,
            "/addr/777777/endpoint",
            Some(json!({"plugin_name": "webhook"}))
        )
        .await,
        404
    );
    assert_status!(
        s.manage(POST, &format!("/addr/{id}/endpoint"), Some(json!({})))
            .await,
        400
    );
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{id}/endpoint"),
            Some(json!({"plugin_name": "webhook", "config": "x"}))
        )
        .await,
        400
    );
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{id}/endpoint"),
            Some(json!({"plugin_name": "webhook", "colour": 1}))
        )
        .await,
        400
    );
    let long = "d".repeat(256);
    let r = s
        .manage(
            POST,
            &format!("/addr/{id}/endpoint"),
            Some(json!({"plugin_name": "webhook", "description": long})),
        )
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("255"));

    // List and get; wrong parent is 404, non-integer id 400.
    let list = s
        .manage(GET, &format!("/addr/{id}/endpoint"), None)
        .await
        .json();
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert_eq!(list[0], ep);
    // One endpoint also says how its deliveries stand (none yet).
    let mut with_stats = ep.clone();
    for (k, v) in [
        ("delivered", json!(0)),
        ("failed", json!(0)),
        ("pending", json!(0)),
        ("last_error", Value::Null),
        ("last_error_at", Value::Null),
    ] {
        with_stats[k] = v;
    }
    assert_eq!(
        s.manage(GET, &format!("/addr/{id}/endpoint/{ep_id}"), None)
            .await
            .json(),
        with_stats
    );
    assert_status!(
        s.manage(GET, &format!("/addr/{other_id}/endpoint/{ep_id}"), None)
            .await,
        404
    );
    assert_status!(
        s.manage(GET, &format!("/addr/{id}/endpoint/999999"), None)
            .await,
        404
    );
    let r = s
        .manage(GET, &format!("/addr/{id}/endpoint/abc"), None)
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("integer"));
    assert_status!(s.manage(GET, "/addr/555555/endpoint", None).await, 404);

    // PATCH.
    let r = s
        .manage(
            PATCH,
            &format!("/addr/{id}/endpoint/{ep_id}"),
            Some(json!({"config": {"url": "http://y/"}, "active": 0, "description": null})),
        )
        .await;
    assert_status!(r, 200);
    let j = r.json();
    assert_eq!(
        (
            j["config"]["url"].as_str(),
            j["active"].as_i64(),
            j["description"].is_null()
        ),
        (Some("http://y/"), Some(0), true)
    );
    // null config and active mean unchanged (robogerctl apply sends them).
    let r = s
        .manage(
            PATCH,
            &format!("/addr/{id}/endpoint/{ep_id}"),
            Some(json!({"config": null, "active": null, "description": "again"})),
        )
        .await;
    let j = r.json();
    assert_eq!(
        (
            j["config"]["url"].as_str(),
            j["active"].as_i64(),
            j["description"].as_str()
        ),
        (Some("http://y/"), Some(0), Some("again"))
    );
    for f in ["id", "addr_id", "plugin_name"] {
        let r = s
            .manage(
                PATCH,
                &format!("/addr/{id}/endpoint/{ep_id}"),
                Some(json!({f: 1})),
            )
            .await;
        assert_status!(r, 405);
        assert!(r.text.contains(f));
    }
    assert_status!(
        s.manage(
            PATCH,
            &format!("/addr/{id}/endpoint/{ep_id}"),
            Some(json!({"skipdups": 1}))
        )
        .await,
        400
    );
    assert_status!(
        s.manage(
            PATCH,
            &format!("/addr/{id}/endpoint/{ep_id}"),
            Some(json!({"config": [1]}))
        )
        .await,
        400
    );
    assert_status!(
        s.manage(
            PATCH,
            &format!("/addr/{other_id}/endpoint/{ep_id}"),
            Some(json!({"active": 1}))
        )
        .await,
        404
    );
    let r = s
        .request(
            PATCH,
            &format!("/manage/v2/addr/{id}/endpoint/{ep_id}"),
            Some(KEY),
            &[("Accept", "text/plain")],
            Some(json!({"active": 1})),
        )
        .await;
    assert_status!(r, 204);

    // Unknown endpoint command.
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{id}/endpoint/{ep_id}"),
            Some(json!({"cmd": "fly"}))
        )
        .await,
        405
    );

    // DELETE.
    assert_status!(
        s.manage(DELETE, &format!("/addr/{other_id}/endpoint/{ep_id}"), None)
            .await,
        404
    );
    assert_status!(
        s.manage(DELETE, &format!("/addr/{id}/endpoint/{ep_id}"), None)
            .await,
        204
    );
    assert_status!(
        s.manage(GET, &format!("/addr/{id}/endpoint/{ep_id}"), None)
            .await,
        404
    );
}

#[tokio::test]
async fn subscriptions() {
    let s = Server::start_with(with_plugins()).await;
    let (id, a) = new_addr(&s).await;
    let ep = new_endpoint(&s, id).await;
    let ep2 = new_endpoint(&s, id).await;
    let base = format!("/addr/{id}/endpoint/{ep}/subscription");

    // Defaults: any location/tag/sender, level 20, ge.
    let r = s.manage(POST, &base, Some(json!({}))).await;
    assert_status!(r, 201);
    let sub = r.json();
    let sid = sub["id"].as_i64().unwrap();
    assert_eq!(
        sub,
        json!({"id": sid, "addr_id": id, "endpoint_id": ep, "active": 1, "location": null, "tag": null, "sender": null, "level": 20, "level_match": "ge"})
    );
    assert_eq!(
        r.header("location").unwrap(),
        format!("/manage/v2{base}/{sid}")
    );
    // robogerctl creates with every field null.
    let r = s
        .manage(POST, &format!("/addr/{a}/endpoint/{ep}/subscription"), Some(json!({"location": null, "tag": null, "sender": null, "level": null, "level_match": null})))
        .await;
    assert_status!(r, 201);
    assert_eq!(
        (r.json()["level"].as_i64(), r.json()["level_match"].as_str()),
        (Some(20), Some("ge"))
    );
    // Levels go through convert_level; gt/lt are aliases.
    let r = s.manage(POST, &base, Some(json!({"level": "warning", "level_match": "gt", "location": "lab", "tag": "t", "sender": "bot"}))).await;
    let j = r.json();
    assert_eq!(
        (
            j["level"].as_i64(),
            j["level_match"].as_str(),
            j["location"].as_str()
        ),
        (Some(30), Some("g"), Some("lab"))
    );
    let r = s
        .manage(POST, &base, Some(json!({"level": 50, "level_match": "lt"})))
        .await;
    assert_eq!(
        (r.json()["level"].as_i64(), r.json()["level_match"].as_str()),
        (Some(50), Some("l"))
    );
    let r = s.manage(POST, &base, Some(json!({"level": "Crit"}))).await;
    assert_eq!(r.json()["level"], 50);

    // Bad input.
    let r = s
        .manage(POST, &base, Some(json!({"level_match": "eq"})))
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("level_match"));
    assert_status!(
        s.manage(POST, &base, Some(json!({"level": [1]}))).await,
        400
    );
    assert_status!(
        s.manage(POST, &base, Some(json!({"tag": "x".repeat(256)})))
            .await,
        400
    );
    assert_status!(s.manage(POST, &base, Some(json!({"tag": 5}))).await, 400);
    assert_status!(
        s.manage(POST, &base, Some(json!({"keywords": "x"}))).await,
        400
    );
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{id}/endpoint/999999/subscription"),
            Some(json!({}))
        )
        .await,
        404
    );

    // List, get, wrong parents.
    let list = s.manage(GET, &base, None).await.json();
    assert_eq!(list.as_array().unwrap().len(), 5);
    assert_eq!(list[0], sub);
    assert_eq!(
        s.manage(GET, &format!("{base}/{sid}"), None).await.json(),
        sub
    );
    assert_status!(
        s.manage(
            GET,
            &format!("/addr/{id}/endpoint/{ep2}/subscription/{sid}"),
            None
        )
        .await,
        404
    );
    let (other, _) = new_addr(&s).await;
    assert_status!(
        s.manage(
            GET,
            &format!("/addr/{other}/endpoint/{ep}/subscription/{sid}"),
            None
        )
        .await,
        404
    );
    assert_status!(s.manage(GET, &format!("{base}/x1"), None).await, 400);

    // PATCH: null is unchanged for level/level_match/active; "" clears filters.
    let r = s
        .manage(
            PATCH,
            &format!("{base}/{sid}"),
            Some(json!({"location": "lab", "level": "e", "level_match": "le"})),
        )
        .await;
    let j = r.json();
    assert_eq!(
        (
            j["location"].as_str(),
            j["level"].as_i64(),
            j["level_match"].as_str()
        ),
        (Some("lab"), Some(40), Some("le"))
    );
    let r = s
        .manage(PATCH, &format!("{base}/{sid}"), Some(json!({"location": "", "tag": null, "sender": null, "level": null, "level_match": null, "active": null})))
        .await;
    let j = r.json();
    assert_eq!(
        (
            j["location"].is_null(),
            j["level"].as_i64(),
            j["level_match"].as_str(),
            j["active"].as_i64()
        ),
        (true, Some(40), Some("le"), Some(1))
    );
    assert_status!(
        s.manage(PATCH, &format!("{base}/{sid}"), Some(json!({"active": 0})))
            .await,
        200
    );
    for f in ["id", "endpoint_id", "addr_id"] {
        assert_status!(
            s.manage(PATCH, &format!("{base}/{sid}"), Some(json!({f: 1})))
                .await,
            405
        );
    }
    assert_status!(
        s.manage(
            PATCH,
            &format!("{base}/{sid}"),
            Some(json!({"level_match": "x"}))
        )
        .await,
        400
    );
    assert_status!(
        s.manage(
            PATCH,
            &format!("/addr/{id}/endpoint/{ep2}/subscription/{sid}"),
            Some(json!({"active": 1}))
        )
        .await,
        404
    );

    // Subscriptions have no commands.
    assert_status!(
        s.manage(POST, &format!("{base}/{sid}"), Some(json!({"cmd": "x"})))
            .await,
        405
    );
    assert_status!(
        s.manage(POST, &format!("{base}/999999"), Some(json!({"cmd": "x"})))
            .await,
        404
    );

    // DELETE.
    assert_status!(
        s.manage(
            DELETE,
            &format!("/addr/{id}/endpoint/{ep2}/subscription/{sid}"),
            None
        )
        .await,
        404
    );
    assert_status!(s.manage(DELETE, &format!("{base}/{sid}"), None).await, 204);
    assert_status!(s.manage(GET, &format!("{base}/{sid}"), None).await, 404);
}

#[tokio::test]
async fn copysub_and_cascades() {
    let s = Server::start_with(with_plugins()).await;
    let (id, _) = new_addr(&s).await;
    let (other, _) = new_addr(&s).await;
    let src = new_endpoint(&s, id).await;
    let dst = new_endpoint(&s, id).await;
    let foreign = new_endpoint(&s, other).await;
    for (lvl, m) in [(10, "e"), (40, "ge")] {
        s.manage(
            POST,
            &format!("/addr/{id}/endpoint/{src}/subscription"),
            Some(json!({"level": lvl, "level_match": m, "tag": "t"})),
        )
        .await;
    }
    s.manage(
        PATCH,
        &format!("/addr/{id}/endpoint/{src}/subscription/1"),
        Some(json!({"active": 0})),
    )
    .await;
    s.manage(
        POST,
        &format!("/addr/{id}/endpoint/{dst}/subscription"),
        Some(json!({"sender": "old"})),
    )
    .await;

    let r = s
        .manage(
            POST,
            &format!("/addr/{id}/endpoint/{src}"),
            Some(json!({"cmd": "copysub", "target": dst})),
        )
        .await;
    assert_status!(r, 204);
    let subs = s
        .manage(
            GET,
            &format!("/addr/{id}/endpoint/{dst}/subscription"),
            None,
        )
        .await
        .json();
    let got: Vec<(i64, String, i64)> = subs
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["level"].as_i64().unwrap(),
                x["level_match"].as_str().unwrap().to_string(),
                x["active"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (20, "ge".into(), 1),
            (10, "e".into(), 1),
            (40, "ge".into(), 1)
        ]
    );

    let r = s
        .manage(
            POST,
            &format!("/addr/{id}/endpoint/{src}"),
            Some(json!({"cmd": "copysub", "target": dst.to_string(), "replace": true})),
        )
        .await;
    assert_status!(r, 204);
    let subs = s
        .manage(
            GET,
            &format!("/addr/{id}/endpoint/{dst}/subscription"),
            None,
        )
        .await
        .json();
    assert_eq!(subs.as_array().unwrap().len(), 2);
    assert!(
        subs.as_array()
            .unwrap()
            .iter()
            .all(|x| x["sender"].is_null())
    );

    // The target must belong to the same address.
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{id}/endpoint/{src}"),
            Some(json!({"cmd": "copysub", "target": foreign}))
        )
        .await,
        404
    );
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{id}/endpoint/{src}"),
            Some(json!({"cmd": "copysub", "target": "x"}))
        )
        .await,
        400
    );
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{id}/endpoint/{src}"),
            Some(json!({"cmd": "copysub"}))
        )
        .await,
        400
    );
    assert_status!(
        s.manage(
            POST,
            &format!("/addr/{other}/endpoint/{src}"),
            Some(json!({"cmd": "copysub", "target": dst}))
        )
        .await,
        404
    );

    // Deleting an endpoint deletes its subscriptions; deleting an address
    // deletes its endpoints (ids are not reused, so a lookup by the old
    // ids through a new address proves nothing was left behind).
    assert_status!(
        s.manage(DELETE, &format!("/addr/{id}/endpoint/{dst}"), None)
            .await,
        204
    );
    assert_status!(
        s.manage(
            GET,
            &format!("/addr/{id}/endpoint/{dst}/subscription"),
            None
        )
        .await,
        404
    );
    assert_status!(s.manage(DELETE, &format!("/addr/{id}"), None).await, 204);
    assert_status!(
        s.manage(GET, &format!("/addr/{id}/endpoint/{src}"), None)
            .await,
        404
    );
    assert_eq!(
        s.manage(GET, &format!("/addr/{other}/endpoint"), None)
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn limits_fields_appear_when_limits_are_configured() {
    let s = Server::start_with(ServerOptions {
        yaml: "limits:\n  period: hour\n  reserve: 10\n".into(),
        ..Default::default()
    })
    .await;
    let (id, _) = new_addr(&s).await;
    let a = s.manage(GET, &format!("/addr/{id}"), None).await.json();
    assert_eq!(
        (a["lim_c"].as_i64(), a["lim_s"].as_i64()),
        (Some(100), Some(10_000_000))
    );
    let a = s
        .manage(PATCH, &format!("/addr/{id}"), Some(json!({"lim_c": 3})))
        .await
        .json();
    assert_eq!(
        (a["lim_c"].as_i64(), a["lim_s"].as_i64()),
        (Some(3), Some(10_000_000))
    );
    let list = s.manage(GET, "/addr", None).await.json();
    assert_eq!(list[0]["lim_c"], 3);
}

#[tokio::test]
async fn master_allow_and_ip_header() {
    let s = start_with_allow("['10.0.0.0/8', '192.168.1.7']").await;
    // The socket peer is 127.0.0.1: not allowed, even with the right key.
    let r = s
        .request(GET, "/manage/v2/core", Some(KEY), &[], None)
        .await;
    assert_status!(r, 403);
    // With ip-header the client's real IP decides.
    assert_status!(
        s.request(
            GET,
            "/manage/v2/core",
            Some(KEY),
            &[("X-Real-IP", "10.20.30.40")],
            None
        )
        .await,
        200
    );
    assert_status!(
        s.request(
            GET,
            "/manage/v2/core",
            Some(KEY),
            &[("X-Real-IP", "192.168.1.7")],
            None
        )
        .await,
        200
    );
    assert_status!(
        s.request(
            GET,
            "/manage/v2/core",
            Some(KEY),
            &[("X-Real-IP", "192.168.1.8")],
            None
        )
        .await,
        403
    );
    assert_status!(
        s.request(
            GET,
            "/manage/v2/core",
            Some("bad"),
            &[("X-Real-IP", "10.0.0.1")],
            None
        )
        .await,
        403
    );
    // Push and ping stay public.
    assert_status!(s.request(GET, "/ping", None, &[], None).await, 204);

    let s = start_with_allow("['127.0.0.0/8']").await;
    assert_status!(
        s.request(GET, "/manage/v2/core", Some(KEY), &[], None)
            .await,
        200
    );
    assert_status!(
        s.request(GET, "/manage/v2/core", None, &[], None).await,
        401
    );
}

/// A client refused in a loop does not fill the log: refusals are
/// logged up to 600 a minute, all kinds together, and every one is
/// still counted in /metrics.
#[tokio::test]
async fn a_client_refused_in_a_loop_has_600_lines_a_minute() {
    let s = start_with_allow("['10.0.0.0/8']").await;
    let refused = (0..1000).map(|_| async {
        s.request(GET, "/manage/v2/core", Some(KEY), &[], None)
            .await
            .status
            .as_u16()
    });
    let statuses = at_once(refused, 16).await;
    assert!(statuses.iter().all(|&st| st == 403), "{statuses:?}");
    // A wrong key shares the budget: refused, its line not written.
    let wrong = [("X-Real-IP", "10.0.0.9")];
    let r = s
        .request(GET, "/manage/v2/core", Some("bad"), &wrong, None)
        .await;
    assert_status!(r, 403);
    assert_eq!(
        s.log_lines("management access from an address not in master.allow")
            .len(),
        600
    );
    assert!(s.log_lines("management access with a wrong key").is_empty());
    assert_eq!(
        s.log_lines(
            "600 lines of refused management access logged in a minute: the rest of the \
             minute's are not, but counted (each refusal is in roboger_management_refused_total)"
        )
        .len(),
        1
    );
    let bearer = format!("Bearer {KEY}");
    let allowed = [("X-Real-IP", "10.0.0.1"), ("Authorization", &bearer)];
    let r = s.request(GET, "/metrics", None, &allowed, None).await;
    assert_status!(r, 200);
    let m = roboger_tests::parse_metrics(&r.text);
    assert_eq!(
        m.get("roboger_management_refused_total{reason=\"not_allowed\"}"),
        Some(&1000.0)
    );
    assert_eq!(
        m.get("roboger_management_refused_total{reason=\"wrong_key\"}"),
        Some(&1.0)
    );
    assert_eq!(m.get("roboger_refused_log_dropped_total"), Some(&401.0));
}

async fn start_with_allow(allow: &str) -> Server {
    start_behind("", allow, None).await
}

/// A server with `ip-header: X-Real-IP` plus `yaml`, `master.allow` set
/// to `allow`, listening as `listen` says (else on 127.0.0.1).
async fn start_behind(yaml: &str, allow: &str, listen: Option<&str>) -> Server {
    Server::start_with(ServerOptions {
        yaml: format!("ip-header: X-Real-IP\n{yaml}"),
        master_yaml: format!("allow: {allow}\n"),
        listen_yaml: listen.map(str::to_string),
        ..Default::default()
    })
    .await
}

/// With `ip-header-from`, the header is believed only from the proxies
/// it names: a client that reaches the server itself cannot choose the
/// address `master.allow` checks. A server any host can reach that
/// believes the header from anyone says so at its start.
#[tokio::test]
async fn ip_header_is_believed_only_from_its_proxies() {
    let real = [("X-Real-IP", "10.20.30.40")];
    // The test's client (127.0.0.1) is not the proxy: its own address
    // is checked, and it is not allowed.
    let s = start_behind("ip-header-from: ['10.0.0.1']\n", "['10.0.0.0/8']", None).await;
    let r = s
        .request(GET, "/manage/v2/core", Some(KEY), &real, None)
        .await;
    assert_status!(r, 403);
    assert!(s.log_lines("believed from every client").is_empty());

    // As the proxy, it is believed.
    let s = start_behind("ip-header-from: ['127.0.0.1']\n", "['10.0.0.0/8']", None).await;
    let r = s
        .request(GET, "/manage/v2/core", Some(KEY), &real, None)
        .await;
    assert_status!(r, 200);
    let r = s
        .request(GET, "/manage/v2/core", Some(KEY), &[], None)
        .await;
    assert_status!(r, 403);

    // Believed from anyone (the original's way) on every interface.
    let s = start_behind("", "['10.0.0.0/8']", Some("listen: 0.0.0.0:0")).await;
    s.wait_log("believed from every client", Duration::from_secs(5))
        .await;
    let s = start_behind(
        "ip-header-from: ['127.0.0.1']\n",
        "['10.0.0.0/8']",
        Some("listen: 0.0.0.0:0"),
    )
    .await;
    assert_status!(
        s.request(GET, "/manage/v2/core", Some(KEY), &real, None)
            .await,
        200
    );
    assert!(
        s.log_lines("believed from every client").is_empty(),
        "{}",
        s.log_text()
    );
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let s = Server::start().await;
    let big = "x".repeat(2 * 1024 * 1024);
    let r = s.manage(POST, "/core", Some(json!({"cmd": big}))).await;
    assert_status!(r, 413);
}

/// Whatever deletes events or an endpoint deletes their deliveries: on
/// PostgreSQL and MySQL no foreign key ties a delivery to its event
/// (migration 9 dropped it, for the group commit's sake), so nothing
/// else would. The key from a delivery to its endpoint stays everywhere.
#[tokio::test]
async fn deleting_events_or_endpoints_leaves_no_delivery_behind() {
    use roboger_tests::{on_mysql, on_postgres};
    let s = Server::start_with(ServerOptions::test_plugin("event-retention: 1\n")).await;
    let db = s.db_client();
    let keys = if on_postgres() {
        "SELECT string_agg(conname, ',' ORDER BY conname) FROM pg_constraint \
         WHERE conrelid = 'delivery'::regclass AND contype = 'f'"
    } else if on_mysql() {
        "SELECT GROUP_CONCAT(constraint_name ORDER BY constraint_name) \
         FROM information_schema.table_constraints WHERE table_schema = DATABASE() \
         AND table_name = 'delivery' AND constraint_type = 'FOREIGN KEY'"
    } else {
        "SELECT group_concat(\"table\") FROM \
         (SELECT \"table\" FROM pragma_foreign_key_list('delivery') ORDER BY 1)"
    };
    let expected = if on_postgres() || on_mysql() {
        "fk_delivery_endpoint"
    } else {
        "endpoint,event"
    };
    assert_eq!(db.query(keys), expected);
    let count = |sql: &str| -> i64 { db.query(sql).parse().expect("a count") };
    let orphans = "SELECT count(*) FROM delivery d \
                   WHERE NOT EXISTS (SELECT 1 FROM event e WHERE e.id = d.event_id)";

    // Two endpoints on one address, one on another; an event each.
    let (kept_id, kept) = s.new_addr().await;
    let gone_ep = s.endpoint(kept_id, "t", json!({})).await;
    let kept_ep = s.endpoint(kept_id, "t", json!({})).await;
    let (gone_id, gone) = s.new_addr().await;
    s.endpoint(gone_id, "t", json!({})).await;
    for (id, a) in [(kept_id, &kept), (gone_id, &gone)] {
        assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
        s.wait_settled(id).await;
    }
    assert_eq!(count("SELECT count(*) FROM delivery"), 3);

    // An endpoint deleted: its deliveries go, the other endpoint's stay.
    let r = s
        .manage(DELETE, &format!("/addr/{kept_id}/endpoint/{gone_ep}"), None)
        .await;
    assert_status!(r, 204);
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM delivery WHERE endpoint_id = {gone_ep}"
        )),
        0
    );
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM delivery WHERE endpoint_id = {kept_ep}"
        )),
        1
    );

    // An address deleted: its events go, and their deliveries.
    assert_status!(
        s.manage(DELETE, &format!("/addr/{gone_id}"), None).await,
        204
    );
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM event WHERE addr_id = {gone_id}"
        )),
        0
    );
    assert_eq!(count(orphans), 0);
    assert_eq!(count("SELECT count(*) FROM delivery"), 1);

    // Events past their retention (1 s), cleaned up: their deliveries go.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count("SELECT count(*) FROM event") > 0 {
        assert!(
            std::time::Instant::now() < end,
            "the event was never cleaned up"
        );
        assert_status!(
            s.manage(POST, "/core", Some(json!({"cmd": "cleanup"})))
                .await,
            204
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(count("SELECT count(*) FROM delivery"), 0);
}

/// A cleanup with a great many events past their retention deletes them a
/// chunk at a time: the server's memory does not grow with their number
/// (it held every old event's id, and those of every pending delivery, at
/// once), and the events still pending, spread among them, are kept.
#[tokio::test]
async fn a_cleanup_of_many_events_keeps_the_server_small_and_spares_pending_ones() {
    const N: u64 = 150_000;
    // One event in this many keeps a pending delivery.
    const EVERY: u64 = 777;
    // Two plugins whose `cleanup` takes 1.5 s each: a cleanup outlasts
    // `timeout` (2 s) whatever the database's speed.
    let slow = |name: &str| {
        format!(
            "- name: {name}\n  command: {}\n  env:\n    TEST_PLUGIN_CLEANUP_DELAY_MS: '1500'\n",
            roboger_tests::test_plugin_bin().display()
        )
    };
    let s = Server::start_with(ServerOptions {
        plugins_yaml: format!("{}{}", slow("t"), slow("u")),
        yaml: "event-retention: 1\n".into(),
        ..Default::default()
    })
    .await;
    let db = s.db_client();
    let count = |sql: &str| -> u64 { db.query(sql).parse().expect("a count") };
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({})).await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    // The copies keep this event's time: once this has passed, every one
    // of them is older than `event-retention`, however fast the copy.
    let all_old = tokio::time::Instant::now() + std::time::Duration::from_millis(1500);
    s.wait_settled(id).await;

    db.copy_history(N, EVERY);
    let pending = N / EVERY;
    assert_eq!(count("SELECT count(*) FROM event"), N + 1);
    assert_eq!(
        count("SELECT count(*) FROM delivery WHERE state = 'pending'"),
        pending
    );

    tokio::time::sleep_until(all_old).await;
    let peak_before = peak_rss_mib(s.pid());
    // Not done within `timeout`: 202, and it goes on. Two commands at once
    // make one cleanup: the second waits for the first's.
    let cleanup = || s.manage(POST, "/core", Some(json!({"cmd": "cleanup"})));
    let (first, second) = tokio::join!(cleanup(), cleanup());
    for r in [first, second] {
        assert_status!(r, 202);
        assert!(r.text.contains("the cleanup goes on"), "{}", r.text);
    }
    s.wait_log(
        &format!("old_events={}", N + 1 - pending),
        std::time::Duration::from_secs(120),
    )
    .await;
    assert_eq!(s.log_lines("core cleanup").len(), 1, "{}", s.log_text());
    let growth = peak_rss_mib(s.pid()) - peak_before;
    assert!(
        growth < 10,
        "the server's peak RSS grew by {growth} MiB in the cleanup"
    );
    assert_eq!(count("SELECT count(*) FROM event"), pending);
    assert_eq!(
        count(
            "SELECT count(*) FROM delivery d WHERE state = 'pending' \
             AND EXISTS (SELECT 1 FROM event e WHERE e.id = d.event_id)"
        ),
        pending
    );
    assert_eq!(count("SELECT count(*) FROM delivery"), pending);
}

/// A deletion that fails within `timeout` is answered with its error and
/// is not made later: its address is pushed to again at once, a cleanup
/// after the database takes deletions again leaves the address, and no
/// deletion is left recorded. (One answered
/// 202 is made later instead: lock_race's tests.)
#[tokio::test]
async fn a_deletion_answered_as_failed_is_not_made_later() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let db = s.db_client();
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({})).await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    s.wait_settled(id).await;
    db.refuse_deletes("event", "OLD.msg = 'm'");
    let path = format!("/addr/{id}");
    let r = s.manage(Method::DELETE, &path, None).await;
    assert_status!(r, 503);
    // Routed to again at once: a push is not refused as to an address
    // being deleted.
    assert_status!(s.push(json!({"addr": a, "msg": "after"})).await, 202);
    db.allow_writes("event");
    let r = s
        .manage(Method::POST, "/core", Some(json!({"cmd": "cleanup"})))
        .await;
    assert_status!(r, 204);
    assert_status!(s.manage(Method::GET, &path, None).await, 200);
    assert_eq!(db.query("SELECT count(*) FROM event"), "2");
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "0");
    assert!(
        !s.log_text().contains("taking up a deletion"),
        "{}",
        s.log_text()
    );
}

/// A deletion the database refuses to record (a full disk, say) is
/// answered 503 saying that it was not recorded and nothing is deleted;
/// the address stays, and is pushed to as before. Before, the 503 said
/// the deletion "may have been recorded all the same": an operator asked
/// again to know, to the same answer, while nothing was deleted.
#[tokio::test]
async fn a_deletion_the_database_refuses_to_record_says_nothing_is_deleted() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let db = s.db_client();
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({})).await;
    db.refuse_inserts("deletion", "NEW.node IS NOT NULL");
    let path = format!("/addr/{id}");
    let r = s.manage(Method::DELETE, &path, None).await;
    assert_status!(r, 503);
    assert!(
        r.text
            .contains("the deletion was not recorded, and nothing is deleted"),
        "{}",
        r.text
    );
    db.allow_writes("deletion");
    assert_status!(s.manage(Method::GET, &path, None).await, 200);
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "0");
}

/// A change the database refuses itself (here a trigger; a full disk, a
/// constraint) is answered 503 "database error", and not told that it
/// may have been made: its transaction ended uncommitted, and asking
/// again is safe. (One whose answer was lost says it may have been:
/// db_outage.)
#[tokio::test]
async fn a_change_the_database_refuses_is_not_said_to_be_made() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let db = s.db_client();
    let (id, _) = s.new_addr().await;
    db.refuse_updates("addr", "NEW.active = 0");
    let path = format!("/addr/{id}");
    let r = s
        .manage(Method::PATCH, &path, Some(json!({"active": 0})))
        .await;
    assert_status!(r, 503);
    assert_eq!(r.text, "database error; see the server log");
    db.allow_writes("addr");
    assert_eq!(s.manage(Method::GET, &path, None).await.json()["active"], 1);
}

/// A deletion that fails within `timeout`, and whose record cannot be
/// deleted either (the database refuses both), is answered 503 saying it
/// could not be called off and is tried again later, and it is: made
/// once the database lets it. Before, the 503 said only "database error"
/// and the address vanished later all the same.
#[tokio::test]
async fn a_failed_deletion_that_cannot_be_called_off_says_it_is_made_later() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let db = s.db_client();
    let (id, _) = s.new_addr().await;
    // Its end deletes its record, and so would calling it off.
    db.refuse_deletes("deletion", "OLD.id > 0");
    let path = format!("/addr/{id}");
    let r = s.manage(Method::DELETE, &path, None).await;
    assert_status!(r, 503);
    assert!(r.text.contains("could not be called off"), "{}", r.text);
    db.allow_writes("deletion");
    s.until_gone(&path).await;
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "0");
}

/// Deleting an address with a long history deletes its events a chunk at
/// a time, so that pushes to the other addresses go on meanwhile. In one
/// transaction, on SQLite, the deletion held the write lock (every push's
/// commit) until it ended, and pushes timed out with 503 (checked; on
/// PostgreSQL and MySQL they did not wait). The answer is 204, or 202 when
/// the deletion outlasts `timeout` and goes on.
#[tokio::test]
async fn deleting_an_address_with_a_long_history_keeps_pushes_going() {
    const N: u64 = 150_000;
    let s =
        std::sync::Arc::new(Server::start_with(ServerOptions::test_plugin("timeout: 1\n")).await);
    let db = s.db_client();
    let count = |sql: &str| -> u64 { db.query(sql).parse().expect("a count") };
    let (old_id, old) = s.new_addr().await;
    let old_ep = s.endpoint(old_id, "t", json!({})).await;
    assert_status!(s.push(json!({"addr": old, "msg": "m"})).await, 202);
    s.wait_settled(old_id).await;
    db.copy_history(N, N);
    assert_eq!(count("SELECT count(*) FROM event"), N + 1);
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({})).await;

    // Pushes to the other address, one after another, until the old one
    // is gone.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let pusher = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !*stopped.borrow() {
                let r = s.push(json!({"addr": a, "msg": "meanwhile"})).await;
                statuses.push((r.status.as_u16(), r.text));
            }
            statuses
        })
    };
    // 204: deleted already; 202: the deletion goes on.
    let r = s.manage(DELETE, &format!("/addr/{old_id}"), None).await;
    match r.status.as_u16() {
        204 => assert_status!(s.manage(GET, &format!("/addr/{old_id}"), None).await, 404),
        202 => assert!(r.text.contains("the deletion goes on"), "{}", r.text),
        _ => panic!("delete: {} {}", r.status, r.text),
    }
    let end = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while s.manage(GET, &format!("/addr/{old_id}"), None).await.status != 404 {
        assert!(
            std::time::Instant::now() < end,
            "the address is still there"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop.send_replace(true);
    let statuses = pusher.await.expect("the pusher");
    assert!(!statuses.is_empty(), "no push was made meanwhile");
    let refused: Vec<_> = statuses.iter().filter(|(st, _)| *st != 202).collect();
    assert!(refused.is_empty(), "pushes refused meanwhile: {refused:?}");
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM event WHERE addr_id = {old_id}"
        )),
        0
    );
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM delivery WHERE endpoint_id = {old_ep}"
        )),
        0
    );
    assert_eq!(
        count(&format!("SELECT count(*) FROM event WHERE addr_id = {id}")),
        statuses.len() as u64
    );
}

/// A change whose client gives up before the answer is still made to its
/// end and logged: hyper drops a request whose client disconnects, and a
/// deletion that outlasted its client used to go on unlogged, neither its
/// `management change` line nor its end ever said.
#[tokio::test]
async fn a_change_whose_client_leaves_is_made_and_logged() {
    let s = Server::start_with(ServerOptions::test_plugin("timeout: 1\n")).await;
    // 300,000 events take a deletion, 500 at a time, well past 1 s.
    let (id, _, _) = s.addr_with_history(&s.db_client(), 300_000).await;
    let gave_up = s
        .http
        .delete(s.url(&format!("/manage/v2/addr/{id}")))
        .header("X-Auth-Key", KEY)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(
        gave_up.as_ref().is_err_and(reqwest::Error::is_timeout),
        "{gave_up:?}"
    );
    s.wait_log(
        "a deletion answered 202 has ended",
        Duration::from_secs(120),
    )
    .await;
    assert_status!(s.manage(GET, &format!("/addr/{id}"), None).await, 404);
    let logged = s.log_lines("management change");
    assert!(
        logged.iter().any(|l| l.contains("method=DELETE")
            && l.contains(&format!("path=/manage/v2/addr/{id} "))
            && l.contains("status=202")),
        "{logged:#?}"
    );
}

/// The address list and an address's endpoint list are read and sent a
/// page at a time, so that a long one does not take the server's memory
/// at once (BENCHMARKS.md, "Many endpoints"): one of several pages still
/// holds every item once, in the order of their ids, as one JSON array,
/// whether its last page is full or not.
#[tokio::test]
async fn long_lists_are_whole_across_pages() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let db = s.db_client();
    let (id, _) = s.new_addr().await;
    let ep = s.endpoint(id, "t", json!({})).await;
    db.copy_endpoint(ep, 1_200, false);
    db.copy_addr(999);
    for (path, n) in [
        ("/addr".to_string(), 1_000),
        (format!("/addr/{id}/endpoint"), 1_201),
    ] {
        let r = s.manage(Method::GET, &path, None).await;
        assert_status!(r, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        // Sent as it is read: its length is not known when it starts.
        assert_eq!(r.header("content-length"), None, "{path}");
        let list: Vec<Value> = serde_json::from_str(&r.text).expect("one JSON array");
        let ids: Vec<i64> = list.iter().filter_map(|v| v["id"].as_i64()).collect();
        assert_eq!(ids.len(), n, "{path}");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{path}: {ids:?}");
    }
    let (empty, _) = s.new_addr().await;
    let r = s
        .manage(Method::GET, &format!("/addr/{empty}/endpoint"), None)
        .await;
    assert_eq!(r.text, "[]");
    // A list that fits one page is answered with its length.
    assert_eq!(r.header("content-length"), Some("2"));
}

/// Changing the settings of an endpoint with a long backlog of deliveries
/// that wait for a later try makes them all due, and the change is
/// answered (and logged) as any other. Making them due took longer than
/// the request may, so the change was made but answered 503 and never
/// logged; on SQLite each chunk of 500 also sorted every waiting delivery
/// of the endpoint again, so the backlog took minutes, most of it never
/// made due once the answer's deadline had cut the walk short.
#[tokio::test]
async fn a_config_change_makes_a_long_backlog_due_and_is_answered() {
    const N: u64 = 150_000;
    let s = Server::start_with(ServerOptions::test_plugin(
        "timeout: 1\ndelivery:\n  max-attempts: 100\n",
    ))
    .await;
    let db = s.db_client();
    let count = |sql: &str| -> u64 { db.query(sql).parse().expect("a count") };
    let (id, _, ep) = s.endpoint_with_waiting_backlog(&db, N).await;
    let waiting = format!(
        "SELECT count(*) FROM delivery WHERE {}",
        roboger_tests::waiting_years(ep)
    );
    assert_eq!(count(&waiting), N);
    // Statistics as a backlog that grew over hours would have them.
    if roboger_tests::on_postgres() {
        db.query("ANALYZE delivery");
    }

    // A target that never answers from now on: what is made due stays
    // pending, tried once a `timeout` at most.
    let r = s
        .manage(
            Method::PATCH,
            &format!("/addr/{id}/endpoint/{ep}"),
            Some(json!({"config": {"hang": true}})),
        )
        .await;
    assert!(r.status.is_success(), "{} {}", r.status, r.text);
    let logged = s.log_lines("management change");
    assert!(
        logged
            .iter()
            .any(|l| l.contains("method=PATCH") && l.contains(&format!("/endpoint/{ep} "))),
        "{logged:?}"
    );
    s.wait_log(
        "its waiting deliveries are due now",
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(count(&waiting), 0);

    // Retrying as many failed deliveries is answered too: 200 with how
    // many, or 202 while it goes on, and then all are pending. (Those in
    // flight now are left as they are: their outcomes are still to come.)
    db.query(&format!(
        "UPDATE delivery SET state = 'failed' WHERE endpoint_id = {ep} AND leased_by IS NULL"
    ));
    let failed = count(&format!(
        "SELECT count(*) FROM delivery WHERE endpoint_id = {ep} AND state = 'failed'"
    ));
    assert!(failed > N / 2, "{failed}");
    let r = s.retry_endpoint(id, ep).await;
    match r.status.as_u16() {
        200 => assert_eq!(r.json()["retried"], failed),
        202 => {
            assert!(r.text.contains("the retry goes on"), "{}", r.text);
            s.wait_log("a retry answered 202 has ended", Duration::from_secs(120))
                .await;
        }
        _ => panic!("retry: {} {}", r.status, r.text),
    }
    let retried = s.log_lines("failed deliveries queued again by hand");
    assert!(
        retried
            .iter()
            .any(|l| l.contains(&format!("deliveries={failed}"))),
        "{retried:?}"
    );
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM delivery WHERE endpoint_id = {ep} AND state = 'failed'"
        )),
        0
    );
}

/// An address with more endpoints than one statement takes bound
/// parameters (SQLite takes 32,766, PostgreSQL and MySQL 65,535) is
/// managed like any other. Re-reading its routes after a change named each
/// of its endpoints in a parameter: the change was made, but answered 503,
/// and from then on no change reached the node's routes, for any address
/// (a new address was unknown to pushes). Deleting it failed the same way.
#[tokio::test]
async fn an_address_with_more_endpoints_than_a_statement_takes_parameters() {
    use roboger_tests::{HttpSink, more_than_a_statement_takes};
    let n = more_than_a_statement_takes();
    let sink = HttpSink::start(vec![]).await;
    // Re-reading the address's routes after each change takes about a
    // second in a debug build.
    let s = Server::start_with(ServerOptions::builtin("webhook", "timeout: 10\n")).await;
    let db = s.db_client();
    let count = |sql: &str| -> u64 { db.query(sql).parse().expect("a count") };
    let (id, a) = new_addr(&s).await;
    let hook = json!({"url": format!("{}/hook", sink.base), "template": "$msg"});
    let ep = s.endpoint(id, "webhook", hook.clone()).await;
    db.copy_endpoint(ep, n, false);
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM subscription s, endpoint e \
             WHERE s.endpoint_id = e.id AND e.addr_id = {id}"
        )),
        n + 1
    );

    // Changes to the address are made, answered, and obeyed.
    let second = s.endpoint(id, "webhook", hook).await;
    let r = s
        .manage(
            PATCH,
            &format!("/addr/{id}/endpoint/{ep}"),
            Some(json!({"active": 0})),
        )
        .await;
    assert_status!(r, 200);
    assert_status!(
        s.push(json!({"addr": a, "msg": "to the second"})).await,
        202
    );
    let got = sink.wait(1).await;
    assert_eq!(&got[0].body[..], b"\"to the second\"");
    s.endpoint_settles(id, second, 1, 0).await;
    assert_eq!(sink.requests().len(), 1, "the first endpoint is off");
    // And so are changes to other addresses.
    let (other_id, other) = new_addr(&s).await;
    s.endpoint(
        other_id,
        "webhook",
        json!({"url": format!("{}/other", sink.base)}),
    )
    .await;
    assert_status!(s.push(json!({"addr": other, "msg": "m"})).await, 202);
    sink.wait(2).await;

    // Deleted with all of them.
    let r = s.manage(DELETE, &format!("/addr/{id}"), None).await;
    assert_status!(r, 204);
    assert_status!(s.manage(GET, &format!("/addr/{id}"), None).await, 404);
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 404);
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM endpoint WHERE addr_id = {id}"
        )),
        0
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM subscription s WHERE NOT EXISTS \
             (SELECT 1 FROM endpoint e WHERE e.id = s.endpoint_id)"
        ),
        0
    );
}

/// The peak resident set of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .expect("the server's VmHWM")
}

#[tokio::test]
async fn changes_that_race_a_delete_find_nothing_there() {
    // Each change reads what it changes, then writes it; an address
    // deleted in between must make it a 404 (gone), like a change sent
    // just after the delete, or a 409 (being deleted), never a database
    // error.
    let s = Server::start_with(with_plugins()).await;
    for _ in 0..25 {
        let (id, a) = new_addr(&s).await;
        let ep = new_endpoint(&s, id).await;
        let r = s
            .manage(
                POST,
                &format!("/addr/{id}/endpoint/{ep}/subscription"),
                Some(json!({"level": "info"})),
            )
            .await;
        assert_status!(r, 201);
        let sub = r.json()["id"].as_i64().unwrap();
        let webhook = json!({"plugin_name": "webhook", "config": {"url": "http://127.0.0.1:1/"}});
        let changes = [
            (
                "PATCH addr",
                PATCH,
                format!("/addr/{id}"),
                json!({"active": false}),
            ),
            (
                "change addr",
                POST,
                format!("/addr/{id}"),
                json!({"cmd": "change"}),
            ),
            (
                "PATCH endpoint",
                PATCH,
                format!("/addr/{id}/endpoint/{ep}"),
                json!({"description": "d"}),
            ),
            (
                "POST endpoint",
                POST,
                format!("/addr/{a}/endpoint"),
                webhook,
            ),
            (
                "PATCH subscription",
                PATCH,
                format!("/addr/{id}/endpoint/{ep}/subscription/{sub}"),
                json!({"level": "error"}),
            ),
            (
                "POST subscription",
                POST,
                format!("/addr/{id}/endpoint/{ep}/subscription"),
                json!({"level": "warning"}),
            ),
        ];
        let sent = changes.iter().map(|(name, m, path, body)| {
            let s = &s;
            async move { (*name, s.manage(m.clone(), path, Some(body.clone())).await) }
        });
        let addr = format!("/addr/{id}");
        let delete = s.manage(DELETE, &addr, None);
        let (answers, deleted) = tokio::join!(futures_util::future::join_all(sent), delete);
        assert_status!(deleted, 204);
        for (name, r) in answers {
            let code = r.status.as_u16();
            // 409 while the deletion goes on: recorded, not yet ended.
            let being_deleted = code == 409 && r.text.contains("is being deleted");
            assert!(
                [200, 201, 204, 301, 404].contains(&code) || being_deleted,
                "{name} racing the address's delete: {code} {}",
                r.text
            );
        }
    }
}

/// A change is logged before it is answered: a client (or a test) that
/// has the answer finds the line in the log. The harness's log reader
/// was once the only one to take lines in, and under load a test that
/// looked at once missed the line (`LiveLog`).
#[tokio::test]
async fn every_change_is_in_the_log_when_it_is_answered() {
    let s = Server::start().await;
    let (id, _) = new_addr(&s).await;
    for i in 0..300 {
        assert_status!(
            s.manage(PATCH, &format!("/addr/{id}"), Some(json!({"lim_c": i})))
                .await,
            200
        );
        let logged = s.log_lines("management change");
        assert_eq!(logged.len(), i + 2, "after change {i}: {logged:#?}");
        assert!(logged[i + 1].contains("method=PATCH"), "{}", logged[i + 1]);
    }
}

#[tokio::test]
async fn changes_are_logged_with_who_made_them() {
    let s = Server::start().await;
    let (id, a) = new_addr(&s).await;
    assert_status!(s.manage(GET, &format!("/addr/{id}"), None).await, 200);
    assert_status!(s.manage(DELETE, "/addr/999999", None).await, 404);
    assert_status!(
        s.manage(PATCH, &format!("/addr/{a}"), Some(json!({"lim_c": 7})))
            .await,
        200
    );
    // An address string is all it takes to push, so the log keeps only
    // its start.
    let short = format!("path=/manage/v2/addr/{}… status=200", &a[..4]);
    s.wait_log(&short, std::time::Duration::from_secs(10)).await;
    let logged = s.log_lines("management change");
    // The address made and the one patched; not the read, nor the
    // delete of nothing.
    assert_eq!(logged.len(), 2, "{logged:#?}");
    assert!(
        logged[0].contains("client=127.0.0.1 via=api method=POST path=/manage/v2/addr status=201"),
        "{}",
        logged[0]
    );
    assert!(
        logged[1].contains("method=PATCH") && logged[1].contains(&short),
        "{}",
        logged[1]
    );
    assert!(!logged[1].contains(&a), "{}", logged[1]);
}

/// An endpoint created disabled (`"active": 0` in its POST) is made so
/// in one write, and is never enabled, not even for a moment. Before, it
/// was created enabled and disabled by a second write: a push between
/// the two was sent to it, and when the database refused that second
/// write the POST was answered 503 with the endpoint left there,
/// enabled. Here the database refuses any update that disables an
/// endpoint.
#[tokio::test]
async fn an_endpoint_created_disabled_is_never_enabled() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let (id, _) = s.new_addr().await;
    s.db_client().refuse_updates("endpoint", "NEW.active = 0");
    let r = s
        .manage(
            POST,
            &format!("/addr/{id}/endpoint"),
            Some(json!({"plugin_name": "t", "active": 0})),
        )
        .await;
    assert_status!(r, 201);
    assert_eq!(r.json()["active"], 0, "{}", r.text);
    let list = s
        .manage(GET, &format!("/addr/{id}/endpoint"), None)
        .await
        .json();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["active"], 0, "{list}");
}

/// A change the database made but this node cannot apply before
/// answering (its read of the routing change log fails just then) is
/// answered as made, with a warning, not 503: a client told it failed
/// would make it again, a second address here. The node's role is made
/// unable to read the log (PostgreSQL: on MySQL a table's grant cannot be
/// taken from an account granted the whole database).
#[tokio::test]
async fn a_change_made_is_answered_as_made_though_this_node_cannot_apply_it() {
    if !roboger_tests::on_postgres() {
        return;
    }
    let Some(db) = roboger_tests::database_with_connection_limit(20) else {
        return;
    };
    let s = Server::start_with(ServerOptions {
        db: Some(db.clone()),
        ..Default::default()
    })
    .await;
    let role = db.rsplit('/').next().unwrap_or_default();
    roboger_tests::DbClient::of(&db).query(&format!("REVOKE SELECT ON routing_change FROM {role}"));
    let r = s.manage(Method::POST, "/addr", None).await;
    assert_status!(r, 201);
    let warned = s.log_lines("a management change is made and answered");
    assert_eq!(warned.len(), 1, "{}", s.log_text());
    assert!(warned[0].contains("routing_change"), "{}", warned[0]);
    let list = s.manage(Method::GET, "/addr", None).await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
}
