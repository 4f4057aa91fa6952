//! The telegram plugin through the real server, against a local fake Bot
//! API that records each request: webhook registration, `/start` answered
//! with an encrypted chat id, HTML messages with the level emoji, media
//! after the text, DEBUG silent, forged chat ids refused.

use base64::Engine;
use roboger_tests::{
    HttpSink, Method, Server, ServerOptions, SinkRequest, Value, assert_status, json, plugin_bin,
};

const TOKEN: &str = "123456:test-token";
const PNG: &[u8] =
    b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

fn json_of(r: &SinkRequest) -> Value {
    assert_eq!(r.headers["content-type"], "application/json");
    serde_json::from_slice(&r.body).expect("a JSON body")
}

/// A server with the bot, its Bot API at `api`.
async fn server(yaml: &str, api: &HttpSink) -> Server {
    Server::start_with(ServerOptions {
        yaml: yaml.into(),
        plugins_yaml: format!(
            "- name: telegram\n  command: {}\n  config:\n    token: '{TOKEN}'\n    api-url: {}\n",
            plugin_bin("telegram").display(),
            api.base
        ),
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn start_then_html_messages_media_and_silent_debug() {
    // Five good answers, then the Bot API failing twice.
    let statuses = vec![200, 200, 200, 200, 200, 502, 502];
    let api = HttpSink::answering(statuses, r#"{"ok": true, "result": {}}"#).await;
    let yaml =
        "url: https://roboger.example.com/\ndelivery:\n  retry-base: 0.05\n  max-attempts: 2\n";
    let s = server(yaml, &api).await;

    // On load: the webhook, under the server's url, with a key derived from the token.
    let hook = json_of(&api.wait(1).await[0]);
    assert_eq!(api.requests()[0].path, format!("/bot{TOKEN}/setWebhook"));
    let hook = hook["url"].as_str().expect("a webhook url").to_string();
    let path = hook
        .strip_prefix("https://roboger.example.com")
        .expect("under the server's url")
        .to_string();
    assert!(
        path.starts_with("/plugin/telegram/") && path.len() > "/plugin/telegram/".len() + 16,
        "{path}"
    );

    // A wrong key is a 404; /start gets the chat its code.
    let update = json!({"update_id": 1, "message": {"message_id": 5, "chat": {"id": -100777, "type": "group"}, "text": "/start"}});
    let r = s
        .request(
            Method::POST,
            "/plugin/telegram/wrong",
            None,
            &[],
            Some(update.clone()),
        )
        .await;
    assert_status!(r, 404);
    let r = s
        .request(Method::POST, &path, None, &[], Some(update))
        .await;
    assert_status!(r, 200);
    let reply = json_of(&api.wait(2).await[1]);
    assert_eq!(api.requests()[1].path, format!("/bot{TOKEN}/sendMessage"));
    assert_eq!(reply["chat_id"], -100777);
    let text = reply["text"].as_str().unwrap_or_default();
    let code = text
        .split("<code>")
        .nth(1)
        .and_then(|t| t.split("</code>").next())
        .expect("the code in the reply")
        .to_string();
    assert!(
        !code.contains("100777"),
        "the chat id is not in clear: {code}"
    );

    // Only codes this bot issued make endpoints.
    let (id, a) = s.new_addr().await;
    for forged in [
        json!({"chat_id": "-100777"}),
        json!({"chat_id": format!("{code}x")}),
    ] {
        let r = s.try_endpoint(id, "telegram", forged).await;
        assert_status!(r, 400);
        assert!(r.text.contains("chat_id"), "{}", r.text);
    }
    let r = s
        .try_endpoint(id, "telegram", json!({"chatid": code}))
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("chatid"), "{}", r.text);
    s.endpoint(id, "telegram", json!({"chat_id": code})).await;

    let media = base64::engine::general_purpose::STANDARD.encode(PNG);
    let r = s
        .push(json!({"addr": a, "level": "warning", "sender": "bot", "subject": "a<b>", "msg": "x & y", "media": media}))
        .await;
    assert_status!(r, 202);
    let got = api.wait(4).await;
    let m = json_of(&got[2]);
    assert_eq!(got[2].path, format!("/bot{TOKEN}/sendMessage"));
    assert_eq!(
        m,
        json!({"chat_id": -100777, "parse_mode": "HTML", "disable_notification": false,
            "link_preview_options": {"is_disabled": true},
            "text": "\u{26a0}\u{fe0f} <b>WARNING bot: a&lt;b&gt;</b>\nx &amp; y"})
    );
    let photo = &got[3];
    assert_eq!(photo.path, format!("/bot{TOKEN}/sendPhoto"));
    let ct = photo.headers["content-type"].to_str().unwrap_or_default();
    assert!(ct.starts_with("multipart/form-data"), "{ct}");
    let body = &photo.body[..];
    assert!(
        body.windows(PNG.len()).any(|w| w == PNG),
        "the photo is uploaded"
    );
    let form = String::from_utf8_lossy(body);
    assert!(
        form.contains("name=\"chat_id\"\r\n\r\n-100777\r\n"),
        "{form}"
    );
    assert!(form.contains("name=\"photo\""), "{form}");

    assert_status!(
        s.push(json!({"addr": a, "level": "debug", "msg": "quiet"}))
            .await,
        202
    );
    let got = api.wait(5).await;
    let m = json_of(&got[4]);
    assert_eq!(
        (m["disable_notification"].as_bool(), m["text"].as_str()),
        (Some(true), Some("\u{1f41b} <b>DEBUG</b>\nquiet"))
    );

    // The Bot API failing is a failed delivery, retried, saying why
    // (its refusals of a chat: a_chat_that_blocked_the_bot_fails_at_once).
    assert_status!(s.push(json!({"addr": a, "msg": "refused"})).await, 202);
    let (state, attempts, why) = s.settled_delivery(id).await;
    assert_eq!((state.as_str(), attempts), ("failed", 2), "{why}");
    assert!(why.contains("sendMessage") && why.contains("502"), "{why}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_server_url_no_webhook_is_registered() {
    let api = HttpSink::answering(vec![], r#"{"ok": true, "result": {}}"#).await;
    let s = server("", &api).await;
    s.wait_log(
        "webhook (/start) is not registered",
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(api.requests().is_empty());
    let update = json!({"message": {"chat": {"id": 42}, "text": "/start"}});
    let r = s
        .request(Method::POST, "/plugin/telegram/x", None, &[], Some(update))
        .await;
    assert_status!(r, 404);
    // A chat id this bot did not issue is refused.
    let (id, _) = s.new_addr().await;
    let r = s
        .try_endpoint(id, "telegram", json!({"chat_id": "x"}))
        .await;
    assert_status!(r, 400);
}

/// Two servers on one database with the same bot (a cluster behind one
/// public url) register the same webhook, and each serves it: the Bot API
/// may call whichever node the load balancer picks.
#[tokio::test(flavor = "multi_thread")]
async fn every_node_of_a_cluster_registers_and_serves_one_webhook() {
    let api = HttpSink::answering(vec![], r#"{"ok": true, "result": {}}"#).await;
    let (_dir, db) = roboger_tests::shared_database();
    let node = || ServerOptions {
        yaml: "url: https://roboger.example.com/\n".into(),
        db: Some(db.clone()),
        plugins_yaml: format!(
            "- name: telegram\n  command: {}\n  config:\n    token: '{TOKEN}'\n    api-url: {}\n",
            plugin_bin("telegram").display(),
            api.base
        ),
        ..Default::default()
    };
    let nodes = Server::start_many(vec![node(), node()]);
    let hooks: Vec<String> = api
        .wait(2)
        .await
        .iter()
        .map(|r| json_of(r)["url"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(hooks[0], hooks[1], "one webhook for the cluster");
    let path = hooks[0]
        .strip_prefix("https://roboger.example.com")
        .expect("under the server's url")
        .to_string();
    for (i, n) in nodes.iter().enumerate() {
        let chat = -100 - i as i64;
        let update = json!({"update_id": i, "message": {"message_id": 5, "chat": {"id": chat, "type": "group"}, "text": "/start"}});
        let r = n
            .request(Method::POST, &path, None, &[], Some(update))
            .await;
        assert_status!(r, 200);
        let replies = api.wait(3 + i).await;
        assert_eq!(json_of(&replies[2 + i])["chat_id"], chat);
    }
}

/// A new address with a telegram endpoint for `chat`, its code got with
/// `/start`: the address's id and string, and the endpoint's id.
async fn chat_endpoint(s: &Server, api: &HttpSink, chat: i64) -> (i64, String, i64) {
    let code = chat_code(s, api, chat).await;
    let (id, a) = s.new_addr().await;
    let ep = s.endpoint(id, "telegram", json!({"chat_id": code})).await;
    (id, a, ep)
}

/// The code the bot gives `chat` for `/start`, from its answer as the
/// Bot API at `api` saw it.
async fn chat_code(s: &Server, api: &HttpSink, chat: i64) -> String {
    let hook = json_of(&api.wait(1).await[0]);
    let path = hook["url"].as_str().expect("a webhook url")["https://roboger.example.com".len()..]
        .to_string();
    let update = json!({"update_id": 1, "message": {"message_id": 5, "chat": {"id": chat, "type": "private"}, "text": "/start"}});
    s.request(Method::POST, &path, None, &[], Some(update))
        .await;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let reply = api
            .requests()
            .iter()
            .find(|r| r.path.ends_with("/sendMessage"))
            .map(json_of);
        if let Some(reply) = reply {
            let text = reply["text"].as_str().unwrap_or_default().to_string();
            return text
                .split("<code>")
                .nth(1)
                .and_then(|t| t.split("</code>").next())
                .expect("the code in the reply")
                .to_string();
        }
        assert!(std::time::Instant::now() < end, "no reply to /start");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A media upload the Bot API fails is tried again without the text,
/// which was sent: the chat sees the text once. A message past the Bot
/// API's 4096 characters (which it refuses, "message is too long") is
/// sent cut to them, saying so, rather than refused on every try.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_sends_only_the_media_and_a_long_text_is_cut() {
    // setWebhook and the answer to /start, the text, a failed upload.
    let api = HttpSink::answering(vec![200, 200, 200, 502], r#"{"ok": true, "result": {}}"#).await;
    let s = server(
        "url: https://roboger.example.com/\ndelivery:\n  retry-base: 0.05\n  max-attempts: 3\n",
        &api,
    )
    .await;
    let (id, a, _) = chat_endpoint(&s, &api, 42).await;
    let media = base64::engine::general_purpose::STANDARD.encode(PNG);
    assert_status!(
        s.push(json!({"addr": a, "msg": "with a photo", "media": media}))
            .await,
        202
    );
    let (state, attempts, why) = s.settled_delivery(id).await;
    assert_eq!((state.as_str(), attempts), ("delivered", 2), "{why}");
    let calls: Vec<String> = api.requests()[2..]
        .iter()
        .map(|r| r.path.rsplit('/').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(calls, ["sendMessage", "sendPhoto", "sendPhoto"]);

    let long = format!("{}{}", "x".repeat(4000), "&".repeat(1000));
    assert_status!(s.push(json!({"addr": a, "msg": long})).await, 202);
    let sent = json_of(&api.wait(6).await[5]);
    let text = sent["text"].as_str().unwrap_or_default();
    let shown = text
        .replace("<b>", "")
        .replace("</b>", "")
        .replace("&amp;", "&");
    assert_eq!(shown.encode_utf16().count(), 4096, "{text}");
    assert!(
        shown.ends_with("\n\u{2026} (cut to Telegram's 4096 characters)"),
        "{text}"
    );
    assert!(shown.contains(&format!("{}&&", "x".repeat(4000))), "{text}");
}

/// A group that Telegram upgraded to a supergroup (the Bot API answers
/// 400 with `parameters.migrate_to_chat_id`) keeps getting its events:
/// the message goes to the supergroup at once, the events after go there
/// directly, media too, and a warning says how to give the endpoint the
/// supergroup's own code. Before, every event to it failed.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_upgraded_to_a_supergroup_keeps_its_events() {
    const OK: &str = r#"{"ok": true, "result": {}}"#;
    const MOVED: &str = r#"{"ok": false, "error_code": 400, "description": "Bad Request: group chat was upgraded to a supergroup chat", "parameters": {"migrate_to_chat_id": -1001234567890}}"#;
    // setWebhook and the answer to /start, then the group has moved.
    let api = HttpSink::replying(vec![(200, OK), (200, OK), (400, MOVED)], OK).await;
    let s = server("url: https://roboger.example.com/\n", &api).await;
    let (id, a, _) = chat_endpoint(&s, &api, -4242).await;
    assert_status!(s.push(json!({"addr": a, "msg": "first"})).await, 202);
    let (state, attempts, why) = s.settled_delivery(id).await;
    assert_eq!((state.as_str(), attempts), ("delivered", 1), "{why}");
    s.wait_log(
        "the Telegram group -4242 became the supergroup -1001234567890",
        std::time::Duration::from_secs(10),
    )
    .await;
    let media = base64::engine::general_purpose::STANDARD.encode(PNG);
    assert_status!(
        s.push(json!({"addr": a, "msg": "second", "media": media}))
            .await,
        202
    );
    let got = api.wait(6).await;
    let sent: Vec<(String, String)> = got[2..]
        .iter()
        .map(|r| {
            let method = r.path.rsplit('/').next().unwrap_or_default().to_string();
            let chat = if method == "sendMessage" {
                json_of(r)["chat_id"].to_string()
            } else {
                let form = String::from_utf8_lossy(&r.body).into_owned();
                form.split("name=\"chat_id\"\r\n\r\n")
                    .nth(1)
                    .and_then(|t| t.split("\r\n").next())
                    .unwrap_or_default()
                    .to_string()
            };
            (method, chat)
        })
        .collect();
    let to = |m: &str, c: &str| (m.to_string(), c.to_string());
    assert_eq!(
        sent,
        [
            to("sendMessage", "-4242"),
            to("sendMessage", "-1001234567890"),
            to("sendMessage", "-1001234567890"),
            to("sendPhoto", "-1001234567890"),
        ]
    );
}

/// Telegram's flood control (429 with `parameters.retry_after`) is waited
/// for: the delivery's next try is no sooner than the Bot API asked.
#[tokio::test(flavor = "multi_thread")]
async fn flood_control_is_waited_for() {
    let flood = r#"{"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 30", "parameters": {"retry_after": 30}}"#;
    let api = HttpSink::answering(vec![429; 64], flood).await;
    let s = server(
        "url: https://roboger.example.com/\ndelivery:\n  retry-base: 2\n",
        &api,
    )
    .await;
    // The code for a chat comes from the bot's answer to /start (which
    // the Bot API refused, but the sink saw).
    let (id, a, ep) = chat_endpoint(&s, &api, 42).await;
    assert_status!(s.push(json!({"addr": a, "msg": "flood"})).await, 202);
    let waits = s.first_retry_waits(id, &[ep]).await;
    let (wait, error) = &waits[0];
    assert!((29.0..=31.0).contains(wait), "retry_after 30 gave {wait} s");
    assert!(error.contains("retry after 30"), "{error}");
}

/// A chat that will never take the message (the user blocked the bot:
/// 403; the chat is gone: 400) fails the delivery at once, with the Bot
/// API's words, instead of on every try until `max-attempts`; the Bot
/// API's own trouble (502) is tried again.
#[tokio::test(flavor = "multi_thread")]
async fn a_chat_that_blocked_the_bot_fails_at_once() {
    const OK: &str = r#"{"ok": true, "result": {}}"#;
    const BLOCKED: &str = r#"{"ok": false, "error_code": 403, "description": "Forbidden: bot was blocked by the user"}"#;
    const GONE: &str =
        r#"{"ok": false, "error_code": 400, "description": "Bad Request: chat not found"}"#;
    const DOWN: &str = r#"{"ok": false, "error_code": 502, "description": "Bad Gateway"}"#;
    // setWebhook and the answer to /start, then one reply per try.
    let replies = vec![
        (200, OK),
        (200, OK),
        (403, BLOCKED),
        (400, GONE),
        (502, DOWN),
    ];
    let api = HttpSink::replying(replies, OK).await;
    let s = server(
        "url: https://roboger.example.com/\ndelivery:\n  retry-base: 0.05\n  max-attempts: 3\n",
        &api,
    )
    .await;
    let (id, a, _) = chat_endpoint(&s, &api, 42).await;
    for (msg, state, attempts, said) in [
        (
            "one",
            "failed",
            1,
            "403 Forbidden: Forbidden: bot was blocked by the user",
        ),
        (
            "two",
            "failed",
            1,
            "400 Bad Request: Bad Request: chat not found",
        ),
        ("three", "delivered", 2, ""),
    ] {
        assert_status!(s.push(json!({"addr": a, "msg": msg})).await, 202);
        let (got, tries, why) = s.settled_delivery(id).await;
        assert_eq!((got.as_str(), tries), (state, attempts), "{msg}: {why}");
        assert!(why.contains(said), "{msg}: {why}");
    }
}
