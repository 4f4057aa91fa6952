//! The slack plugin through the real server, against a local HTTP server
//! standing in for Slack's incoming webhook.

use roboger_tests::{
    HttpSink, Method, Server, ServerOptions, Value, assert_status, json, plugin_bin,
};

async fn server() -> Server {
    Server::start_with(ServerOptions {
        yaml: "delivery:\n  retry-base: 0.05\n  max-attempts: 2\n".into(),
        plugins_yaml: format!(
            "- name: slack\n  command: {}\n",
            plugin_bin("slack").display()
        ),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn plain_and_rich_messages_with_the_sender_as_username() {
    let sink = HttpSink::start(vec![]).await;
    let s = server().await;
    let (id, a) = s.new_addr().await;
    let r = s
        .try_endpoint(id, "slack", json!({"url": "http://x/", "rihc": true}))
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("rihc"), "{}", r.text);
    let r = s
        .try_endpoint(id, "slack", json!({"url": "http://x/", "rich": "yes"}))
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("rich"), "{}", r.text);

    s.endpoint(id, "slack", json!({"url": format!("{}/plain", sink.base)}))
        .await;
    s.endpoint(
        id,
        "slack",
        json!({"url": format!("{}/rich", sink.base), "rich": true}),
    )
    .await;
    let r = s
        .push(json!({"addr": a, "sender": "bot", "level": "critical", "subject": "db", "msg": "down \"hard\"\n<now> <!channel> & <https://x|y>"}))
        .await;
    assert_status!(r, 202);
    let got = sink.wait(2).await;
    // Slack's control characters as the entities Slack shows as they
    // are: no mention of the whole channel, no disguised link.
    let shown = "down \"hard\"\n&lt;now&gt; &lt;!channel&gt; &amp; &lt;https://x|y&gt;";
    let body = |path: &str| -> Value {
        let req = got.iter().find(|r| r.path == path).expect("a request");
        assert_eq!(req.headers["content-type"], "application/json");
        serde_json::from_slice(&req.body).expect("JSON")
    };
    assert_eq!(
        body("/plain"),
        json!({"text": format!("CRITICAL bot: db\n{shown}"), "username": "bot"})
    );
    assert_eq!(
        body("/rich"),
        json!({"text": "", "username": "bot", "attachments": [{
            "fallback": "CRITICAL bot: db", "color": "#FF2222",
            "fields": [{"title": "CRITICAL bot: db", "value": shown, "short": false}]}]})
    );

    // Colours follow the level; no sender, no username.
    let colours = [
        ("debug", "#555555"),
        ("info", "good"),
        ("warning", "warning"),
        ("error", "danger"),
    ];
    for (i, (level, colour)) in colours.into_iter().enumerate() {
        assert_status!(s.push(json!({"addr": a, "level": level})).await, 202);
        let got = sink.wait(4 + 2 * i).await;
        let rich: Value = serde_json::from_slice(
            &got.iter()
                .rev()
                .find(|r| r.path == "/rich")
                .expect("rich")
                .body,
        )
        .expect("JSON");
        assert_eq!(rich["attachments"][0]["color"], colour);
        assert!(rich.get("username").is_none(), "{rich}");
    }
}

/// A Slack webhook URL is a secret (anyone with it can post to the
/// channel): the plugin's schema marks it so, and a refused delivery is
/// logged with `[secret]` in its place. The management API still
/// returns it whole to the master key.
#[tokio::test]
async fn the_webhook_url_is_never_said() {
    let sink = HttpSink::start(vec![500]).await;
    let s = server().await;
    let (id, a) = s.new_addr().await;
    let url = format!("{}/services/T0/B0/Xsecretpath", sink.base);
    let ep = s.endpoint(id, "slack", json!({ "url": url })).await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    sink.wait(2).await;
    roboger_tests::poll_until(std::time::Duration::from_secs(10), async || {
        match s.log_text().contains("[secret] answered 500") {
            true => Ok(()),
            false => Err("no refusal in the log".to_string()),
        }
    })
    .await;
    assert!(!s.log_text().contains("Xsecretpath"), "{}", s.log_text());
    let got = s
        .manage(Method::GET, &format!("/addr/{id}/endpoint/{ep}"), None)
        .await
        .json();
    assert_eq!(got["config"]["url"], url.as_str());
}

/// Slack's answers that say the webhook will never take the message
/// (its own words: a removed webhook, an archived channel, ...) fail the
/// delivery at once, with Slack's reason in its error; its other answers
/// are tried again. Once the webhook is mended, the endpoint's `retry`
/// delivers.
#[tokio::test]
async fn what_slack_will_never_take_fails_at_once() {
    let s = server().await;
    for (status, said, attempts) in [
        (400, "invalid_payload", 1),
        (403, "action_prohibited", 1),
        (404, "no_service", 1),
        (410, "channel_is_archived", 1),
        (500, "rollup_error", 2),
        (429, "rate_limited", 2),
    ] {
        // Refused on every try, then (mended) taken.
        let sink = HttpSink::replying(vec![(status, said); attempts], "ok").await;
        let (id, a) = s.new_addr().await;
        let ep = s
            .endpoint(id, "slack", json!({"url": format!("{}/hook", sink.base)}))
            .await;
        assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
        let (got, tries, why) = s.settled_delivery(id).await;
        assert_eq!(
            (got.as_str(), tries),
            ("failed", attempts as i64),
            "{status}: {why}"
        );
        assert!(
            why.contains(&format!("answered {status}")) && why.contains(said),
            "{why}"
        );
        let r = s.retry_endpoint(id, ep).await;
        assert_status!(r, 200);
        assert_eq!(r.json()["retried"], 1);
        let (got, _, why) = s.settled_delivery(id).await;
        assert_eq!(got, "delivered", "{status}: {why}");
        assert_eq!(sink.wait(attempts + 1).await.len(), attempts + 1);
    }
}
