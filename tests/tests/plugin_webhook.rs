//! The webhook plugin through the real server, against a local HTTP sink
//! that checks the exact body.

use roboger_tests::{HttpSink, Method, Server, ServerOptions, Value, assert_status, json};

async fn server() -> (Server, i64, String) {
    server_retrying("0.05").await
}

/// A server with the webhook plugin whose backoff starts at `base`
/// seconds, and an address on it.
async fn server_retrying(base: &str) -> (Server, i64, String) {
    let s = Server::start_with(ServerOptions::builtin(
        "webhook",
        &format!("delivery:\n  retry-base: {base}\n"),
    ))
    .await;
    let (id, addr) = s.new_addr().await;
    (s, id, addr)
}

/// Once `sink` has got `n` requests, the `msg` of each it has got (each
/// body the template `{"msg": $msg}`), sorted.
async fn sorted_msgs(sink: &HttpSink, n: usize) -> Vec<String> {
    let mut msgs: Vec<String> = sink
        .wait(n)
        .await
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .filter_map(|v| v["msg"].as_str().map(String::from))
        .collect();
    msgs.sort();
    msgs
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

    // A GET (a heartbeat URL, say) goes without a body, so it takes no
    // template.
    let r = bad(json!({"url": "http://x/", "method": "GET", "template": "{}"})).await;
    assert_status!(r, 400);
    assert!(r.text.contains("a GET sends no body"), "{}", r.text);
    let ping = HttpSink::start(vec![]).await;
    let (id, a) = s.new_addr().await;
    s.endpoint(
        id,
        "webhook",
        json!({"url": format!("{}/ping", ping.base), "method": "GET"}),
    )
    .await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    let got = ping.wait(1).await;
    assert_eq!(got[0].method, "GET");
    assert!(got[0].body.is_empty(), "{got:?}");
    for h in ["content-type", "content-length", "transfer-encoding"] {
        assert!(!got[0].headers.contains_key(h), "{h}: {got:?}");
    }
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
    // (spread by up to a fifth, and shown to the microsecond on every
    // backend: MySQL's times were whole seconds, making it 1 s or 2 s).
    let (wait, _) = &waits_s[2];
    assert!((1.5..=2.5).contains(wait), "no Retry-After gave {wait} s");
    assert!(wait.fract() != 0.0, "a wait of whole seconds: {wait} s");
    // And that one is retried and delivered meanwhile; the others wait.
    assert_eq!(silent.wait(2).await.len(), 2);
    assert_eq!((waits.requests().len(), too_long.requests().len()), (1, 1));
}

/// An endpoint whose settings change is no longer held by what its old
/// target answered: the delivery it refused and the ones put off after
/// it are due at once, with their attempts as they were, and go to the
/// new target, long before the ten minutes asked for end.
#[tokio::test]
async fn a_changed_endpoint_is_no_longer_held() {
    let (s, id, a) = server().await;
    let waits = HttpSink::retry_after(vec![429], "600").await;
    let fixed = HttpSink::start(vec![]).await;
    let ep = s
        .endpoint(
            id,
            "webhook",
            json!({"url": format!("{}/hook", waits.base)}),
        )
        .await;
    let push = |msg: &str| json!({"addr": a, "msg": msg});
    assert_status!(s.push(push("first")).await, 202);
    let waited = s.first_retry_waits(id, &[ep]).await;
    assert!(waited[0].0 > 590.0, "{waited:?}");
    assert_status!(s.push(push("second")).await, 202);
    s.metric_reaches(r#"roboger_deliveries_held_total{plugin="webhook"}"#, 1.0)
        .await;
    let changed = json!({"config": {
        "url": format!("{}/hook", fixed.base),
        "template": r#"{"msg": $msg}"#,
    }});
    let r = s
        .manage(
            Method::PATCH,
            &format!("/addr/{id}/endpoint/{ep}"),
            Some(changed),
        )
        .await;
    assert!(r.status.is_success(), "{}: {}", r.status, r.text);
    assert_eq!(sorted_msgs(&fixed, 2).await, ["first", "second"]);
    s.endpoint_settles(id, ep, 2, 0).await;
    // The refused one had spent one attempt, the put-off one none.
    let events = s
        .manage(Method::GET, &format!("/addr/{id}/event"), None)
        .await
        .json();
    for e in events.as_array().into_iter().flatten() {
        let path = format!("/addr/{id}/event/{}", e["id"].as_str().unwrap_or_default());
        let e = s.manage(Method::GET, &path, None).await.json();
        let want = if e["msg"] == "first" { 2 } else { 1 };
        assert_eq!(e["deliveries"][0]["attempts"], want, "{e}");
    }
    assert_eq!(waits.requests().len(), 1);
}

/// A delivery put off while its endpoint is on hold is not lost when the
/// database refuses the put-off: the server writes it as the delivery's
/// outcome instead, and it is made exactly once, its attempts unspent
/// meanwhile. (When it is made is the hold's business, and the next test
/// checks that: on one node, a delivery written as due at once is put off
/// again by the same hold, so when the fallback wrote it due does not show
/// here.)
#[tokio::test]
async fn a_put_off_the_database_refused_is_still_made() {
    let (s, id, a) = server().await;
    // Long enough for the second push to meet the hold on a loaded
    // machine; the sink's wait (20 s) outlasts it.
    let waits = HttpSink::retry_after(vec![429], "10").await;
    let config = json!({
        "url": format!("{}/hook", waits.base),
        "template": r#"{"msg": $msg}"#,
    });
    let ep = s.endpoint(id, "webhook", config).await;
    let push = |msg: &str| json!({"addr": a, "msg": msg});
    assert_status!(s.push(push("first")).await, 202);
    s.first_retry_waits(id, &[ep]).await;
    // The put-off (and the outcome written in its place) are the only
    // writes that give a delivery this error.
    let db = s.db_client();
    db.refuse_updates("delivery", "NEW.last_error LIKE 'not tried%'");
    assert_status!(s.push(push("second")).await, 202);
    s.wait_log(
        "cannot put off deliveries to an endpoint on hold",
        std::time::Duration::from_secs(20),
    )
    .await;
    db.allow_writes("delivery");
    assert_eq!(sorted_msgs(&waits, 3).await, ["first", "first", "second"]);
    s.endpoint_settles(id, ep, 2, 0).await;
    let second = s.newest_event(id).await;
    assert_eq!(second["msg"], "second", "{second}");
    assert_eq!(second["deliveries"][0]["attempts"], 1, "{second}");
    assert_eq!(waits.requests().len(), 3, "made more than once");
}

/// Once a target has asked for a wait, the endpoint's other deliveries
/// are not sent to it meanwhile: each is put off until the wait's end,
/// its attempts unspent, and says why. Other endpoints go on.
#[tokio::test]
async fn an_endpoint_whose_target_asked_for_a_wait_is_held() {
    let (s, id, a) = server().await;
    let waits = HttpSink::retry_after(vec![429], "30").await;
    let open = HttpSink::start(vec![]).await;
    let mut endpoints = Vec::new();
    for sink in [&waits, &open] {
        let config = json!({"url": format!("{}/hook", sink.base)});
        endpoints.push(s.endpoint(id, "webhook", config).await);
    }
    let push = |msg: &str| json!({"addr": a, "msg": msg});
    assert_status!(
        s.request(Method::POST, "/push", None, &[], Some(push("first")))
            .await,
        202
    );
    s.first_retry_waits(id, &endpoints[..1]).await;
    let first = s.newest_event(id).await;
    let due = |e: &Value| {
        let d = e["deliveries"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["endpoint_id"] == endpoints[0]))
            .cloned()
            .unwrap_or_default();
        let at = d["next_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        (d, at)
    };
    let (_, first_due) = due(&first);
    assert_status!(
        s.request(Method::POST, "/push", None, &[], Some(push("second")))
            .await,
        202
    );
    // The open endpoint has both; the held one was asked once, for the
    // first event only.
    let got = open.wait(2).await;
    assert_eq!(got.len(), 2);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let second = loop {
        let e = s.newest_event(id).await;
        let (d, _) = due(&e);
        if e["msg"] == "second"
            && d["last_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("not tried"))
        {
            break e;
        }
        assert!(std::time::Instant::now() < end, "not put off: {e}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let (d, second_due) = due(&second);
    assert_eq!(
        (d["state"].as_str(), d["attempts"].as_i64()),
        (Some("pending"), Some(0)),
        "{d}"
    );
    assert!(
        d["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("not tried: the target asked for a wait until ")),
        "{d}"
    );
    let (Some(first_due), Some(second_due)) = (first_due, second_due) else {
        panic!("no next_at: {first} {second}");
    };
    assert!(
        (second_due - first_due).num_milliseconds().abs() <= 1000,
        "put off until {second_due}, the hold ends at {first_due}"
    );
    // Its lease is given back: whichever node is free takes it when due.
    assert!(d["leased_by"].is_null(), "{d}");
    // A burst meanwhile is put off as a whole, none of it sent.
    let burst = (0..40).map(|i| {
        s.request(
            Method::POST,
            "/push",
            None,
            &[],
            Some(push(&format!("burst {i}"))),
        )
    });
    for r in futures_util::future::join_all(burst).await {
        assert_status!(r, 202);
    }
    assert_eq!(open.wait(42).await.len(), 42);
    s.metric_reaches(r#"roboger_deliveries_held_total{plugin="webhook"}"#, 41.0)
        .await;
    let ep = s
        .manage(
            Method::GET,
            &format!("/addr/{id}/endpoint/{}", endpoints[0]),
            None,
        )
        .await
        .json();
    assert_eq!(
        (ep["pending"].as_i64(), ep["failed"].as_i64()),
        (Some(42), Some(0)),
        "{ep}"
    );
    assert_eq!(waits.requests().len(), 1);
}

/// A password in a target's URL is sent (as basic authentication) but
/// never said, nor a token in its query or its path (a Mattermost
/// webhook's key, here): the log and the delivery's error
/// name the URL with `[secret]` in their place, whether the target
/// refused the delivery or could not be reached (where reqwest's own
/// error, "error sending request for url (…)", named the token).
#[tokio::test]
async fn a_password_in_the_targets_url_is_never_said() {
    use base64::Engine;
    let sink = HttpSink::start(vec![500]).await;
    let (s, id, a) = server().await;
    let with_password = |base: &str| base.replacen("http://", "http://bob:hunter22@", 1);
    let as_said = |base: &str| base.replacen("http://", "http://bob:[secret]@", 1);
    s.endpoint(
        id,
        "webhook",
        json!({"url": format!("{}/hooks/xl4f3fejx7bwdbhcxufhqhmyqa?token=tok3n&v=1", with_password(&sink.base))}),
    )
    .await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let down = s
        .endpoint(
            id,
            "webhook",
            json!({"url": with_password(&format!("http://127.0.0.1:{closed}/down?token=tok3n"))}),
        )
        .await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    let got = sink.wait(2).await;
    let basic = base64::engine::general_purpose::STANDARD.encode("bob:hunter22");
    assert_eq!(
        got[1].headers["authorization"].to_str().ok(),
        Some(format!("Basic {basic}").as_str())
    );
    let refused = format!(
        "{}/hooks/[secret]?token=[secret]&v=1 answered 500",
        as_said(&sink.base)
    );
    let unreachable = format!(
        "{}/down?token=[secret]: ",
        as_said(&format!("http://127.0.0.1:{closed}"))
    );
    roboger_tests::poll_until(std::time::Duration::from_secs(10), async || {
        let log = s.log_text();
        match (log.contains(&refused), log.contains(&unreachable)) {
            (true, true) => Ok(()),
            _ => Err(format!("no {refused:?} and {unreachable:?} in the log")),
        }
    })
    .await;
    let ep = s
        .manage(Method::GET, &format!("/addr/{id}/endpoint/{down}"), None)
        .await
        .json();
    let last_error = ep["last_error"].as_str().unwrap_or_default();
    assert!(last_error.starts_with(&unreachable), "{ep}");
    let log = s.log_text();
    for secret in ["hunter22", "tok3n", "xl4f3fejx7bwdbhcxufhqhmyqa"] {
        assert!(!log.contains(secret), "{secret}: {log}");
    }
}

/// A target that takes the request and never answers fails its own
/// delivery, within the webhook's budget just under the server's
/// timeout, and no other: the server sends the deliveries due for one
/// plugin in one batch, and the batch used to time out whole with it, so
/// a healthy target's delivery failed too ("send_batch timed out").
#[tokio::test]
async fn a_target_that_never_answers_fails_only_its_own_delivery() {
    let hung = HttpSink::start(vec![]).await;
    hung.hold();
    let fine = HttpSink::start(vec![]).await;
    let s = Server::start_with(ServerOptions::builtin(
        "webhook",
        "timeout: 1\ndelivery:\n  max-attempts: 1\n",
    ))
    .await;
    let (id, a) = s.new_addr().await;
    let hung_ep = s
        .endpoint(id, "webhook", json!({"url": format!("{}/hung", hung.base)}))
        .await;
    let fine_ep = s
        .endpoint(id, "webhook", json!({"url": format!("{}/fine", fine.base)}))
        .await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    s.endpoint_settles(id, fine_ep, 1, 0).await;
    s.endpoint_settles(id, hung_ep, 0, 1).await;
    assert_eq!(fine.requests().len(), 1);
    let ep = s
        .manage(Method::GET, &format!("/addr/{id}/endpoint/{hung_ep}"), None)
        .await
        .json();
    // The webhook's own request timeout (naming the URL), or the SDK's
    // bound on the send just after it, whichever ends first: a first
    // request also sets up the HTTP client, which can take their gap.
    let error = ep["last_error"].as_str().unwrap_or_default();
    assert!(
        (error.contains(&format!("{}/hung", hung.base)) && error.contains("timed out"))
            || error.contains("did not finish within 0.95 s"),
        "{ep}"
    );
}

/// A target that redirects with 301, 302 or 303 would have the event
/// arrive where it leads as a GET without its body (as browsers and
/// `requests` follow them), "delivered" to whatever page answers there
/// and lost: the delivery fails instead, saying where the redirect
/// leads (its credentials masked). 307 and 308 keep the method and body
/// and are followed.
#[tokio::test]
async fn a_redirect_that_would_drop_the_body_is_not_followed() {
    let s = Server::start_with(ServerOptions::builtin(
        "webhook",
        "delivery:\n  retry-base: 0.05\n  max-attempts: 2\n",
    ))
    .await;
    let to = "/new?token=s3cret";
    for (code, followed) in [
        (301, false),
        (302, false),
        (303, false),
        (307, true),
        (308, true),
    ] {
        let redirects = if followed { 1 } else { 2 };
        let sink = HttpSink::replying(vec![(code, to); redirects], "ok").await;
        let (id, a) = s.new_addr().await;
        let url = format!("{}/old", sink.base);
        let template = r#"{"msg": $msg}"#;
        s.endpoint(id, "webhook", json!({"url": url, "template": template}))
            .await;
        assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
        let (state, attempts, why) = s.settled_delivery(id).await;
        let got: Vec<(String, String, String)> = sink
            .requests()
            .into_iter()
            .map(|r| {
                let body = String::from_utf8_lossy(&r.body).into_owned();
                (r.method, r.path, body)
            })
            .collect();
        let sent = |path: &str| {
            (
                "POST".to_string(),
                path.to_string(),
                r#"{"msg": "m"}"#.to_string(),
            )
        };
        if followed {
            assert_eq!(
                (state.as_str(), attempts),
                ("delivered", 1),
                "{code}: {why}"
            );
            assert_eq!(got, [sent("/old"), sent("/new")], "{code}");
        } else {
            assert_eq!((state.as_str(), attempts), ("failed", 2), "{code}: {why}");
            assert_eq!(got, [sent("/old"), sent("/old")], "{code}");
            let leads = format!(
                "a redirect to {}/new?token=[secret], not followed",
                sink.base
            );
            assert!(why.contains(&format!("/old answered {code} ")), "{why}");
            assert!(why.contains(&leads) && why.contains("307 or 308"), "{why}");
            assert!(!why.contains("s3cret"), "{why}");
        }
    }
}

/// An endpoint's `headers` are checked when it is made: one that is not
/// an HTTP header, or that the request sets itself from its body (a
/// wrong `Content-Length` left the target waiting until the request
/// timed out, on every try), is a 400 naming it. A `Content-Type` given
/// replaces the JSON one rather than being sent beside it; `Host` is
/// sent as given.
#[tokio::test]
async fn headers_are_checked_and_replace_the_content_type() {
    let sink = HttpSink::start(vec![]).await;
    let (s, id, a) = server().await;
    let url = format!("{}/h", sink.base);
    for (headers, said) in [
        (
            json!({"X-A": "a\r\nB: c"}),
            "headers: \"X-A\" must be one line of text",
        ),
        (
            json!({"Bad Name": "x"}),
            "headers: \"Bad Name\" is not an HTTP header name",
        ),
        (
            json!({"Content-Length": "5"}),
            "headers: \"Content-Length\" is set by the request itself",
        ),
        (
            json!({"Transfer-Encoding": "chunked"}),
            "headers: \"Transfer-Encoding\" is set by the request itself",
        ),
    ] {
        let r = s
            .try_endpoint(id, "webhook", json!({"url": url, "headers": headers}))
            .await;
        assert_status!(r, 400);
        assert!(r.text.contains(said), "{headers}: {}", r.text);
    }
    let headers = json!({"Content-Type": "text/plain", "Host": "example.test", "X-Token": "t"});
    s.endpoint(id, "webhook", json!({"url": url, "headers": headers}))
        .await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    let got = sink.wait(1).await;
    let all = |name: &str| -> Vec<String> {
        got[0]
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    };
    assert_eq!(all("content-type"), ["text/plain"]);
    assert_eq!(all("host"), ["example.test"]);
    assert_eq!(all("x-token"), ["t"]);
    let (state, _, why) = s.settled_delivery(id).await;
    assert_eq!(state, "delivered", "{why}");
}
