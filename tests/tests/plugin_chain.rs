//! The chain plugin with two real servers: an event pushed to the first
//! arrives, fields and media intact, at the second's address.

use base64::Engine;
use roboger_tests::{
    HttpSink, Method, Server, ServerOptions, Value, assert_status, json, plugin_bin,
};

fn with(plugin: &str) -> ServerOptions {
    ServerOptions {
        yaml: "delivery:\n  retry-base: 0.05\n  max-attempts: 2\n".into(),
        plugins_yaml: format!(
            "- name: {plugin}\n  command: {}\n",
            plugin_bin(plugin).display()
        ),
        ..Default::default()
    }
}

#[tokio::test]
async fn forwards_every_field_to_the_other_server() {
    let sink = HttpSink::start(vec![]).await;
    let far = Server::start_with(with("webhook")).await;
    let (far_id, far_addr) = far.new_addr().await;
    let template = r#"{"msg": $msg, "subject": $subject, "level": $level, "location": $location,
        "tag": $tag, "sender": $sender, "media": $media}"#;
    far.endpoint(
        far_id,
        "webhook",
        json!({"url": sink.base, "template": template}),
    )
    .await;

    let near = Server::start_with(with("chain")).await;
    let (id, a) = near.new_addr().await;
    let r = near
        .try_endpoint(id, "chain", json!({"url": far.base, "adr": far_addr}))
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("adr"), "{}", r.text);
    near.endpoint(id, "chain", json!({"url": far.base, "addr": far_addr}))
        .await;

    let media = base64::engine::general_purpose::STANDARD.encode(b"\x00\x01binary\xff");
    let r = near
        .push(json!({"addr": a, "msg": "m\n\"q\"", "subject": "s", "level": "error", "location": "lab",
            "tag": "t", "sender": "bot", "media": media}))
        .await;
    assert_status!(r, 202);
    let got = sink.wait(1).await;
    let body: Value = serde_json::from_slice(&got[0].body).expect("JSON");
    assert_eq!(
        body,
        json!({"msg": "m\n\"q\"", "subject": "s", "level": 40, "location": "lab", "tag": "t",
            "sender": "bot", "media": media})
    );
    assert_eq!(
        near.wait_settled(id).await["deliveries"][0]["state"],
        "delivered"
    );
    // The far server knows the event came through one other.
    assert_eq!(events(&far, far_id).await[0]["hops"], 1);

    // The far address disabled: its 406 is a failed delivery, saying so.
    let r = far
        .manage(
            Method::PATCH,
            &format!("/addr/{far_id}"),
            Some(json!({"active": 0})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    assert_status!(near.push(json!({"addr": a, "msg": "again"})).await, 202);
    let (state, _, why) = near.settled_delivery(id).await;
    assert_eq!(state, "failed", "{why}");
    assert!(why.contains("406"), "{why}");
}

/// Two servers whose chain endpoints forward to each other (each to
/// mirror the other, say) pass an event back and forth until it has
/// been forwarded 8 times: the ninth push is refused with 409, and that
/// delivery fails at once, saying why. Nothing goes round for ever.
#[tokio::test]
async fn chain_endpoints_forwarding_to_each_other_stop_after_eight_hops() {
    let (a, b) = tokio::join!(
        Server::start_with(with("chain")),
        Server::start_with(with("chain"))
    );
    let ((a_id, a_addr), (b_id, b_addr)) = tokio::join!(a.new_addr(), b.new_addr());
    a.endpoint(a_id, "chain", json!({"url": b.base, "addr": b_addr}))
        .await;
    b.endpoint(b_id, "chain", json!({"url": a.base, "addr": a_addr}))
        .await;
    assert_status!(a.push(json!({"addr": a_addr, "msg": "round"})).await, 202);

    // The event B took after seven forwards: A refuses the eighth.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let last = loop {
        let events = events(&b, b_id).await;
        if let Some(e) = events.iter().find(|e| e["hops"] == 7) {
            let id = e["id"].as_str().expect("event id").to_string();
            break b.wait_event_settled(b_id, &id, end).await;
        }
        assert!(
            std::time::Instant::now() < end,
            "no event of 7 hops on B: {events:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // Failed at once: a loop does not heal by trying again.
    let d = &last["deliveries"][0];
    assert_eq!(
        (&d["state"], &d["attempts"]),
        (&json!("failed"), &json!(1)),
        "{last}"
    );
    let why = d["last_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("409 Conflict") && why.contains("in a loop?"),
        "{why}"
    );

    // Every hop stored once, each with its count, and delivered but the last.
    for (s, id, want) in [(&a, a_id, [6, 4, 2, 0]), (&b, b_id, [7, 5, 3, 1])] {
        let events = events(s, id).await;
        let hops: Vec<i64> = events.iter().filter_map(|e| e["hops"].as_i64()).collect();
        assert_eq!(hops, want, "{events:?}");
        assert!(events.iter().all(|e| e["msg"] == "round"), "{events:?}");
        for e in events.iter().filter(|e| e["hops"] != 7) {
            let ev = e["id"].as_str().unwrap_or_default();
            let detail = s.wait_event_settled(id, ev, end).await;
            assert_eq!(detail["deliveries"][0]["state"], "delivered", "{detail}");
        }
    }
}

/// Addr `id`'s events, newest first.
async fn events(s: &Server, id: i64) -> Vec<Value> {
    let r = s
        .manage(Method::GET, &format!("/addr/{id}/event"), None)
        .await;
    assert_status!(r, 200);
    r.json().as_array().cloned().unwrap_or_default()
}

/// Pushes `msg` to `addr` saying it was forwarded `hops` times.
async fn push_forwarded(s: &Server, addr: &str, hops: &str) -> roboger_tests::Resp {
    s.request(
        Method::POST,
        "/push",
        None,
        &[("X-Roboger-Hops", hops)],
        Some(json!({"addr": addr, "msg": hops})),
    )
    .await
}

/// What a push's `X-Roboger-Hops` may say, and what is stored of it.
#[tokio::test]
async fn a_push_says_how_often_it_was_forwarded() {
    let s = Server::start_with(with("webhook")).await;
    let (id, addr) = s.new_addr().await;
    for bad in ["", "x", "-1", "2.0"] {
        let r = push_forwarded(&s, &addr, bad).await;
        assert_status!(r, 400);
        assert!(r.text.contains("x-roboger-hops"), "{bad:?}: {}", r.text);
    }
    for looped in ["8", "65536", "99999999999999999999999"] {
        let r = push_forwarded(&s, &addr, looped).await;
        assert_status!(r, 409);
        assert!(r.text.contains("loop"), "{looped}: {}", r.text);
    }
    assert_status!(push_forwarded(&s, &addr, "7").await, 202);
    assert_status!(s.push(json!({"addr": addr, "msg": "direct"})).await, 202);
    let got: Vec<(Value, Value)> = events(&s, id)
        .await
        .iter()
        .map(|e| (e["msg"].clone(), e["hops"].clone()))
        .collect();
    assert_eq!(got, [(json!("direct"), json!(0)), (json!("7"), json!(7))]);
}

/// The far server's address is over its limit: its 429 says with
/// `Retry-After` when the window ends, and the near server's chain
/// delivery waits until then, not its own backoff.
#[tokio::test]
async fn a_far_address_over_its_limit_is_tried_again_when_its_window_ends() {
    let far = Server::start_with(ServerOptions {
        yaml: "limits:\n  period: 20\n".into(),
        ..with("webhook")
    })
    .await;
    let (far_id, far_addr) = far.new_addr().await;
    assert_status!(
        far.manage(
            Method::PATCH,
            &format!("/addr/{far_id}"),
            Some(json!({"lim_c": 1}))
        )
        .await,
        200
    );
    let near = Server::start_with(with("chain")).await;
    let (id, a) = near.new_addr().await;
    let ep = near
        .endpoint(id, "chain", json!({"url": far.base, "addr": far_addr}))
        .await;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    // Both pushes early in one 20-second window of the far server's.
    if now() % 20.0 > 12.0 {
        tokio::time::sleep(std::time::Duration::from_secs_f64(20.0 - now() % 20.0)).await;
    }
    assert_status!(near.push(json!({"addr": a, "msg": "first"})).await, 202);
    assert_eq!(
        near.wait_settled(id).await["deliveries"][0]["state"],
        "delivered"
    );
    let before = now();
    assert_status!(near.push(json!({"addr": a, "msg": "second"})).await, 202);
    let waits = near.first_retry_waits(id, &[ep]).await;
    let (wait, error) = &waits[0];
    assert!(error.contains("429"), "{error}");
    // Until the end of the window, in whole seconds rounded up from
    // when the far server answered, which was between `before` and now.
    let end = before - before % 20.0 + 20.0;
    let (least, most) = (end - now(), end - before + 1.0);
    assert!(
        (least - 0.1..=most + 0.1).contains(wait),
        "waited {wait} s for a window ending in {least} to {most} s"
    );
}

/// An event the far server will never take (its media is larger than
/// the far `push-max-media`: 413) fails at once, the far answer in its
/// error; an address not there (404) is tried again, as it may appear.
/// The far address is all it takes to push there, so no error says it,
/// not even the far server's answer that quotes it.
#[tokio::test]
async fn an_event_the_far_server_will_never_take_fails_at_once() {
    let far = Server::start_with(ServerOptions {
        yaml: "push-max-media: 16\n".into(),
        ..with("webhook")
    })
    .await;
    let (_, far_addr) = far.new_addr().await;
    let near = Server::start_with(with("chain")).await;
    let media = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
    for (addr, media, state, attempts, said) in [
        (
            far_addr.as_str(),
            media.as_str(),
            "failed",
            1,
            "413 Payload Too Large: media is larger than 16 bytes (push-max-media)",
        ),
        ("nowhere", "", "failed", 2, "404"),
    ] {
        let (id, a) = near.new_addr().await;
        near.endpoint(id, "chain", json!({"url": far.base, "addr": addr}))
            .await;
        assert_status!(
            near.push(json!({"addr": a, "msg": "m", "media": media}))
                .await,
            202
        );
        let (got, tries, why) = near.settled_delivery(id).await;
        assert_eq!((got.as_str(), tries), (state, attempts), "{addr}: {why}");
        assert!(why.contains(said), "{addr}: {why}");
        assert!(!why.contains(addr), "{addr}: {why}");
    }
    assert!(!near.log_text().contains("nowhere"), "{}", near.log_text());
}
