//! The shell plugin through the real server: the event reaches the
//! command only through its environment, so shell metacharacters in a
//! message stay data.

use std::time::Duration;

use roboger_tests::{Method, Server, ServerOptions, assert_status, json, plugin_bin, poll_until};

#[tokio::test]
async fn the_event_reaches_the_command_as_environment_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let pwned = dir.path().join("pwned");
    let script = dir.path().join("record.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s' \"$ROBOGER_MSG\" > {out}.msg\nprintf '%s|%s|%s|%s|%s' \"$ROBOGER_LEVEL\" \"$ROBOGER_LEVEL_NAME\" \"$ROBOGER_FORMATTED_SUBJECT\" \"$ROBOGER_TAG\" \"$ROBOGER_MEDIA_FNAME\" > {out}.fields\ncat \"$ROBOGER_MEDIA_FILE\" > {out}.media\necho done\n",
            out = out.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let s = Server::start_with(ServerOptions {
        yaml: "delivery:\n  retry-base: 0.05\n  max-attempts: 2\n".into(),
        plugins_yaml: format!(
            "- name: shell\n  command: {}\n",
            plugin_bin("shell").display()
        ),
        ..Default::default()
    })
    .await;
    let a = s.manage(Method::POST, "/addr", None).await.json();
    let (id, addr) = (
        a["id"].as_i64().unwrap(),
        a["a"].as_str().unwrap().to_string(),
    );
    let r = s
        .manage(
            Method::POST,
            &format!("/addr/{id}/endpoint"),
            Some(json!({"plugin_name": "shell", "config": {"comand": "x"}})),
        )
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("comand"), "{}", r.text);
    let r = s
        .manage(Method::POST, &format!("/addr/{id}/endpoint"), Some(json!({"plugin_name": "shell", "config": {"command": script.display().to_string()}})))
        .await;
    assert_status!(r, 201);
    let ep = r.json()["id"].as_i64().unwrap();
    s.manage(
        Method::POST,
        &format!("/addr/{id}/endpoint/{ep}/subscription"),
        Some(json!({"level": 10})),
    )
    .await;

    let msg = format!(
        "$(touch {p}); `touch {p}`; \"q\" 'q' ; rm -rf / --no; echo $HOME\nline2 & | > < *",
        p = pwned.display()
    );
    let media = roboger_tests::json!("aGVsbG8=");
    let r = s
        .request(Method::POST, "/push", None, &[], Some(json!({"addr": addr, "msg": msg, "level": "warning", "tag": "t$x", "media": media, "media_fname": "a/b.txt"})))
        .await;
    assert_status!(r, 202);
    let msg_file = dir.path().join("out.msg");
    poll_until(Duration::from_secs(10), async || match msg_file.exists() {
        true => Ok(()),
        false => Err(format!("the command never ran:\n{}", s.log.lock().unwrap())),
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read_to_string(&msg_file).unwrap(), msg);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.fields")).unwrap(),
        "30|WARNING|WARNING|t$x|b.txt"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.media")).unwrap(),
        "hello"
    );
    assert!(!pwned.exists(), "the message was executed");
    s.wait_log("command: done", Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_failing_or_hanging_command_is_a_failed_delivery() {
    let s = Server::start_with(ServerOptions {
        yaml: "timeout: 1\ndelivery:\n  retry-base: 0.05\n  max-attempts: 2\n".into(),
        plugins_yaml: format!(
            "- name: shell\n  command: {}\n",
            plugin_bin("shell").display()
        ),
        ..Default::default()
    })
    .await;
    // The endpoints below are checked by the running plugin. (CI once saw
    // a debug build's start outlast `timeout: 1` twice in a row; a start
    // now has 10 s however short `timeout` is.)
    s.wait_log("plugin running", Duration::from_secs(20)).await;
    let a = s.manage(Method::POST, "/addr", None).await.json();
    let (id, addr) = (
        a["id"].as_i64().unwrap(),
        a["a"].as_str().unwrap().to_string(),
    );
    for (tag, command) in [("fail", "echo broken >&2; exit 3"), ("hang", "sleep 30")] {
        let r = s
            .manage(
                Method::POST,
                &format!("/addr/{id}/endpoint"),
                Some(json!({"plugin_name": "shell", "config": {"command": command}})),
            )
            .await;
        let ep = r.json()["id"].as_i64().unwrap();
        s.manage(
            Method::POST,
            &format!("/addr/{id}/endpoint/{ep}/subscription"),
            Some(json!({"tag": tag})),
        )
        .await;
        assert_status!(
            s.request(
                Method::POST,
                "/push",
                None,
                &[],
                Some(json!({"addr": addr, "tag": tag}))
            )
            .await,
            202
        );
    }
    let errors = poll_until(Duration::from_secs(20), async || {
        let events = s
            .manage(Method::GET, &format!("/addr/{id}/event"), None)
            .await
            .json();
        let mut errors = Vec::new();
        for e in events.as_array().unwrap() {
            let e = s
                .manage(
                    Method::GET,
                    &format!("/addr/{id}/event/{}", e["id"].as_str().unwrap()),
                    None,
                )
                .await
                .json();
            if e["deliveries"][0]["state"] == "failed" {
                errors.push(
                    e["deliveries"][0]["last_error"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
            }
        }
        match errors.len() {
            2 => Ok(errors),
            _ => Err(format!("{errors:?}")),
        }
    })
    .await;
    assert!(errors.iter().any(|e| e.contains("broken")), "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("did not finish") || e.contains("timed out")),
        "{errors:?}"
    );
}
