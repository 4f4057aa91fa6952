//! A database that Roboger 2.0.45 made, taken over by this server: the
//! original itself (from PyPI, through its own core) fills a fresh
//! database on the suite's backend, and a server started on it serves
//! what it holds, as an operator replacing the original would find it:
//! its addresses, endpoints (a Telegram chat's code made by the
//! original's crypto among them), subscriptions and bucket objects.

use std::process::Command;

use roboger_tests::{
    DbClient, HttpSink, Method, Server, ServerOptions, Value, assert_status, fresh_database, json,
    original_python, plugin_bin,
};

/// The bot of the Telegram endpoint, and the chat its code names.
const TOKEN: &str = "123456:original-token";
const CHAT: i64 = -100123;

/// What `tests/original/fill.py` made, as it printed it.
struct Made {
    addr_id: i64,
    addr: String,
    endpoint: i64,
    telegram: i64,
    public: String,
    expired: String,
}

/// Has the original fill database `db` (this server's URL for it), with
/// its webhook endpoint sending to `hook`.
fn fill(python: &std::path::Path, db: &str, hook: &str) -> Made {
    // The original's SQLAlchemy names the MySQL driver the suite installs.
    let sqlalchemy = db.replacen("mysql://", "mysql+pymysql://", 1);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/original/fill.py");
    let out = Command::new(python)
        .args([script, &sqlalchemy, hook, TOKEN, &CHAT.to_string()])
        .output()
        .expect("the original's Python runs");
    assert!(
        out.status.success(),
        "fill.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("fill.py prints JSON");
    let text = |k: &str| v[k].as_str().expect(k).to_string();
    Made {
        addr_id: v["addr_id"].as_i64().expect("addr_id"),
        addr: text("addr"),
        endpoint: v["endpoint"].as_i64().expect("endpoint"),
        telegram: v["telegram"].as_i64().expect("telegram"),
        public: text("public"),
        expired: text("expired"),
    }
}

#[tokio::test]
async fn a_database_the_original_made_is_taken_over() {
    let Some(python) = original_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let db = fresh_database(dir.path());
    let sink = HttpSink::start(vec![]).await;
    let bot_api = HttpSink::answering(vec![], r#"{"ok": true, "result": {}}"#).await;
    let made = fill(&python, &db, &format!("{}/hook", sink.base));
    let s = Server::start_with(ServerOptions {
        db: Some(db.clone()),
        yaml: "url: https://roboger.example.com/\n".into(),
        plugins_yaml: format!(
            "- name: webhook\n  command: {}\n- name: telegram\n  command: {}\n  \
             config:\n    token: '{TOKEN}'\n    api-url: {}\n",
            plugin_bin("webhook").display(),
            plugin_bin("telegram").display(),
            bot_api.base
        ),
        ..Default::default()
    })
    .await;
    let (id, ep) = (made.addr_id, made.endpoint);

    // What the original made, as the management API shows it.
    let addrs = s.manage(Method::GET, "/addr", None).await.json();
    assert_eq!(addrs, json!([{"id": id, "a": made.addr, "active": 1}]));
    let eps = s
        .manage(Method::GET, &format!("/addr/{id}/endpoint"), None)
        .await
        .json();
    assert_eq!(
        eps[0],
        json!({"id": ep, "addr_id": id, "plugin_name": "webhook", "active": 1,
            "description": "from 2.0.45",
            "config": {"url": format!("{}/hook", sink.base), "template": "{\"m\": $msg, \"l\": $level}"}})
    );
    assert_eq!(
        (
            &eps[1]["id"],
            &eps[1]["plugin_name"],
            eps.as_array().map(Vec::len)
        ),
        (&json!(made.telegram), &json!("telegram"), Some(2))
    );
    let subs = s.subscriptions(id, ep).await;
    let rules: Vec<(Value, Value, Value)> = subs
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| {
            (
                r["sender"].clone(),
                r["level"].clone(),
                r["level_match"].clone(),
            )
        })
        .collect();
    assert_eq!(
        rules,
        vec![
            (json!("bot1"), json!(30), json!("ge")),
            (Value::Null, json!(20), json!("l")),
        ]
    );

    // A push to the address senders know is delivered, through either
    // subscription: bot1's warning, and a debug event below INFO.
    for mut event in [
        json!({"sender": "bot1", "level": "warning", "msg": "Привет 🚀"}),
        json!({"level": "debug", "msg": "below"}),
    ] {
        event["addr"] = json!(made.addr);
        assert_status!(s.push(event).await, 202);
    }
    let mut got: Vec<Value> = sink
        .wait(2)
        .await
        .iter()
        .map(|r| serde_json::from_slice(&r.body).expect("the template's JSON"))
        .collect();
    got.sort_by_key(|v| v["l"].as_i64());
    assert_eq!(
        got,
        vec![
            json!({"m": "below", "l": 10}),
            json!({"m": "Привет 🚀", "l": 30})
        ]
    );
    // bot1's warning reached the chat the original's code names.
    let sent = &bot_api.wait(2).await[1];
    assert_eq!(sent.path, format!("/bot{TOKEN}/sendMessage"));
    let sent: Value = serde_json::from_slice(&sent.body).expect("JSON");
    assert_eq!(sent["chat_id"], CHAT);
    assert!(
        sent["text"]
            .as_str()
            .is_some_and(|t| t.contains("Привет 🚀")),
        "{sent}"
    );

    // Its public bucket object is served as the original served it; the
    // expired one is not, and the cleanup removes it.
    let file_of = async |id: &str| {
        s.request(Method::GET, &format!("/file/{id}"), None, &[], None)
            .await
    };
    let file = file_of(&made.public).await;
    assert_status!(file, 200);
    assert_eq!(file.text, "kept from 2.0.45");
    assert_eq!(file.header("roboger-file-name"), Some("kept.txt"));
    assert_eq!(file.header("x-roboger-origin"), Some("original"));
    let max_age: u64 = file
        .header("cache-control")
        .and_then(|c| c.strip_prefix("public, max-age="))
        .and_then(|n| n.parse().ok())
        .expect("a max-age");
    assert!((3000..=3600).contains(&max_age), "{max_age}");
    let expired = file_of(&made.expired).await;
    assert_status!(expired, 404);
    let cleanup = s
        .manage(Method::POST, "/core", Some(json!({"cmd": "cleanup"})))
        .await;
    assert_status!(cleanup, 204);
    let client = DbClient::of(&db);
    assert_eq!(client.query("SELECT id FROM bucket"), made.public);

    // Written through this server: a rule the original's enum holds, text
    // outside Latin-1, limits; then the address, with all it has.
    let sub = s
        .manage(
            Method::POST,
            &format!("/addr/{id}/endpoint/{ep}/subscription"),
            Some(json!({"level": "error", "level_match": "lt", "tag": "ü🚀"})),
        )
        .await;
    assert_status!(sub, 201);
    assert_eq!(
        (&sub.json()["level_match"], &sub.json()["tag"]),
        (&json!("l"), &json!("ü🚀"))
    );
    let lim = s
        .manage(
            Method::PATCH,
            &format!("/addr/{id}"),
            Some(json!({"lim_c": 7, "lim_s": 9000})),
        )
        .await;
    assert_status!(lim, 200);
    for (column, value) in [("lim_c", "7"), ("lim_s", "9000")] {
        let sql = format!("SELECT {column} FROM addr WHERE id = {id}");
        assert_eq!(client.query(&sql), value, "{column}");
    }
    // The ids go on from the original's (its sequence, AUTO_INCREMENT or
    // rowid), with an endpoint on the new address.
    let (next, _) = s.new_addr().await;
    assert_eq!(next, id + 1);
    let next_ep = s.endpoint(next, "webhook", json!({"url": sink.base})).await;
    assert_eq!(next_ep, made.telegram + 1);
    let gone = s.manage(Method::DELETE, &format!("/addr/{id}"), None).await;
    assert_status!(gone, 204);
    let file = file_of(&made.public).await;
    assert_status!(file, 404);
    assert_eq!(client.query("SELECT count(*) FROM bucket"), "0");
}
