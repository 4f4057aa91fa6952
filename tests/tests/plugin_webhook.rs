//! The webhook plugin through the real server, against a local HTTP sink
//! that checks the exact body.

use roboger_tests::{
    HttpSink, Method, Server, ServerOptions, Value, assert_status, json, plugin_bin,
};

async fn server() -> (Server, i64, String) {
    server_retrying("0.05").await
}

/// A server with the webhook plugin whose backoff starts at `base`
/// seconds, and an address on it.
async fn server_retrying(base: &str) -> (Server, i64, String) {
    let s = Server::start_with(ServerOptions {
        yaml: format!("delivery:\n  retry-base: {base}\n"),
        plugins_yaml: format!(
            "- name: webhook\n  command: {}\n",
            plugin_bin("webhook").display()
        ),
        ..Default::default()
    })
    .await;
    let (id, addr) = s.new_addr().await;
    (s, id, addr)
}

#[tokio::test]
async fn sends_the_template_with_every_value_json_encoded() {
    let sink = HttpSink::start(vec![]).await;
    let (s, id, a) = server().await;
    let p = s.manage(Method::GET, "/plugin", None).await.json();
    assert_eq!(
        (p[0]["plugin_name"].as_str(), p[0]["state"].as_str()),
        (Some("webhook"), Some("running"))
    );
    assert!(p[0]["version"].is_string() && p[0]["description"].is_string());
    let template = r#"{"id": $event_id, "msg": $msg, "subject": $formatted_subject, "level": $level,
        "name": $level_name, "loc": $location, "tag": $tag, "sender": $sender, "media": $media, "addr": $addr}"#;
    s.endpoint(id, "webhook", json!({"url": format!("{}/hook?x=1", sink.base), "template": template, "headers": {"X-Token": "secret"}})).await;
    let msg = "disk \"full\"\nbreak out: \"}, \"evil\": 1";
    let r = s
        .request(
            Method::POST,
            "/push",
            None,
            &[],
            Some(json!({"addr": a, "msg": msg, "level": "error", "sender": "bot", "subject": "s"})),
        )
        .await;
    assert_status!(r, 202);
    let got = sink.wait(1).await;
    let req = &got[0];
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/hook"));
    assert_eq!(req.headers["content-type"], "application/json");
    assert_eq!(req.headers["x-token"], "secret");
    let body: Value = serde_json::from_slice(&req.body).expect("the body is valid JSON");
    assert_eq!(body["msg"], msg);
    assert!(body.get("evil").is_none());
    assert_eq!(body["subject"], "ERROR bot: s");
    assert_eq!(
        (body["level"].as_u64(), body["name"].as_str()),
        (Some(40), Some("ERROR"))
    );
    assert_eq!(
        (
            body["loc"].clone(),
            body["tag"].clone(),
            body["media"].clone()
        ),
        (Value::Null, Value::Null, Value::Null)
    );
    assert_eq!(body["addr"], a.as_str());
    assert_eq!(body["id"].as_str().unwrap().len(), 36);
}

#[tokio::test]
async fn configs_are_checked_and_failures_are_retried() {
    let sink = HttpSink::start(vec![500, 503]).await;
    let (s, id, a) = server().await;
    let bad = |config: Value| s.try_endpoint(id, "webhook", config);
    let r = bad(json!({"urll": "http://x/"})).await;
    assert_status!(r, 400);
    assert!(r.text.contains("urll"), "{}", r.text);
    let r = bad(json!({"url": 5})).await;
    assert_status!(r, 400);
    assert!(r.text.contains("url"), "{}", r.text);
    assert_status!(bad(json!({"url": "ftp://x/"})).await, 400);
    let r = bad(json!({"url": "http://x/", "template": "{\"a\": $msg"})).await;
    assert_status!(r, 400);
    assert!(r.text.contains("template"), "{}", r.text);
    assert_status!(
        bad(json!({"url": "http://x/", "method": "TRACE"})).await,
        400
    );

    // No template: the body is null, as in the original; non-2xx retried.
    s.endpoint(
        id,
        "webhook",
        json!({"url": format!("{}/plain", sink.base), "method": "PUT"}),
    )
    .await;
    assert_status!(
        s.request(
            Method::POST,
            "/push",
            None,
            &[],
            Some(json!({"addr": a, "msg": "m"}))
        )
        .await,
        202
    );
    let got = sink.wait(3).await;
    assert!(
        got.iter()
            .all(|r| r.method == "PUT" && &r.body[..] == b"null"),
        "{got:?}"
    );
    let (state, attempts, _) = s.settled_delivery(id).await;
    assert_eq!((state.as_str(), attempts), ("delivered", 3));
}

/// A target that answers 429 or 503 with `Retry-After` is not tried again
/// before then (within `delivery.retry-max`); one without it is retried
/// on the server's own backoff.
#[tokio::test]
async fn a_targets_retry_after_is_waited_for() {
    // A backoff long enough that each first attempt stays in view.
    let (s, id, a) = server_retrying("2").await;
    let waits = HttpSink::retry_after(vec![429], "30").await;
    let too_long = HttpSink::retry_after(vec![503], "3600").await;
    let silent = HttpSink::start(vec![429]).await;
    let mut endpoints = Vec::new();
    for sink in [&waits, &too_long, &silent] {
        let config = json!({"url": format!("{}/hook", sink.base)});
        endpoints.push(s.endpoint(id, "webhook", config).await);
    }
    let push = json!({"addr": a, "msg": "later"});
    assert_status!(
        s.request(Method::POST, "/push", None, &[], Some(push))
            .await,
        202
    );
    let waits_s = s.first_retry_waits(id, &endpoints).await;
    let (wait, error) = &waits_s[0];
    assert!(
        (29.0..=31.0).contains(wait),
        "Retry-After: 30 gave {wait} s"
    );
    assert!(error.contains("429"), "{error}");
    // An hour asked for is held to retry-max (600 s by default).
    let (wait, _) = &waits_s[1];
    assert!(
        (599.0..=601.0).contains(wait),
        "Retry-After: 3600 gave {wait} s"
    );
    // Without Retry-After the backoff is the server's: retry-base, 2 s.
    let (wait, _) = &waits_s[2];
    assert!((1.5..=2.5).contains(wait), "no Retry-After gave {wait} s");
    // And that one is retried and delivered meanwhile; the others wait.
    assert_eq!(silent.wait(2).await.len(), 2);
    assert_eq!((waits.requests().len(), too_long.requests().len()), (1, 1));
}
