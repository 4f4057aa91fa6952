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
