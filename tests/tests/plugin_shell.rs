//! The shell plugin through the real server: the event reaches the
//! command only through its environment, so shell metacharacters in a
//! message stay data.

use std::collections::BTreeMap;
use std::time::Duration;

use roboger_tests::{Method, Server, ServerOptions, assert_status, json, poll_until};

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
    let s = shell_server("delivery:\n  retry-base: 0.05\n  max-attempts: 2\n").await;
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
    // A command as written for the original, which spliced its
    // placeholders into the text: they are variables here, single quotes
    // or not.
    let original = format!(
        "printf '%s|%s|%s|%s|%s' \"$formatted_subject\" \"$msg\" $tag $level '[$level_name] $msg' > {out}.original",
        out = out.display()
    );
    s.manage(
        Method::POST,
        &format!("/addr/{id}/endpoint/{ep}/subscription"),
        Some(json!({"level": 10})),
    )
    .await;
    s.endpoint(id, "shell", json!({"command": original})).await;

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
        false => Err(format!("the command never ran:\n{}", s.log_text())),
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
    let original = dir.path().join("out.original");
    poll_until(Duration::from_secs(10), async || match original.exists() {
        true => Ok(()),
        false => Err("the original's command never ran".to_string()),
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        std::fs::read_to_string(&original).unwrap(),
        format!("WARNING|{msg}|t$x|30|[WARNING] {msg}")
    );
    assert!(!pwned.exists(), "the message was executed");
    s.wait_log("command: done", Duration::from_secs(5)).await;
}

/// A server running the shell plugin, with `yaml` as its config, once
/// the plugin runs (the endpoints made next are checked by it; CI once
/// saw a debug build's start outlast `timeout: 1` twice in a row, and a
/// start now has 10 s however short `timeout` is).
async fn shell_server(yaml: &str) -> Server {
    let s = Server::start_with(ServerOptions::builtin("shell", yaml)).await;
    s.wait_log("plugin running", Duration::from_secs(20)).await;
    s
}

/// Runs each command for one event: an endpoint per command, subscribed
/// to its tag, and an event pushed with it. Returns the address's id.
async fn run_tagged(s: &Server, commands: &[(&str, String)]) -> i64 {
    let a = s.manage(Method::POST, "/addr", None).await.json();
    let (id, addr) = (
        a["id"].as_i64().unwrap(),
        a["a"].as_str().unwrap().to_string(),
    );
    for (tag, command) in commands {
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
    id
}

/// Once every event of address `id` has its outcome: each event's tag
/// with its delivery's state and last error.
async fn outcomes(s: &Server, id: i64, n: usize) -> BTreeMap<String, (String, String)> {
    poll_until(Duration::from_secs(20), async || {
        let events = s
            .manage(Method::GET, &format!("/addr/{id}/event"), None)
            .await
            .json();
        let mut outcomes = BTreeMap::new();
        for e in events.as_array().unwrap() {
            let e = s
                .manage(
                    Method::GET,
                    &format!("/addr/{id}/event/{}", e["id"].as_str().unwrap()),
                    None,
                )
                .await
                .json();
            let d = &e["deliveries"][0];
            if d["state"] != "pending" {
                let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                outcomes.insert(text(&e["tag"]), (text(&d["state"]), text(&d["last_error"])));
            }
        }
        match outcomes.len() == n {
            true => Ok(outcomes),
            false => Err(format!("{outcomes:?}")),
        }
    })
    .await
}

#[tokio::test]
async fn a_failing_or_hanging_command_is_a_failed_delivery() {
    let s = shell_server("timeout: 1\ndelivery:\n  retry-base: 0.05\n  max-attempts: 2\n").await;
    let commands = [
        ("fail", "echo broken >&2; exit 3".to_string()),
        ("hang", "sleep 30".into()),
    ];
    let id = run_tagged(&s, &commands).await;
    let o = outcomes(&s, id, 2).await;
    assert_eq!(o["fail"].0, "failed", "{o:?}");
    assert!(o["fail"].1.contains("broken"), "{o:?}");
    assert_eq!(o["hang"].0, "failed", "{o:?}");
    assert!(
        o["hang"].1.contains("did not finish") || o["hang"].1.contains("timed out"),
        "{o:?}"
    );
}

/// A command's output is read to its end within bounds, and a command's
/// own exit ends its delivery. Before: a command printing 200 MB took the
/// plugin (which serves every shell endpoint) to 200 MB and logged every
/// line, `yes` crashed it at its 4 GiB address-space limit, a command that
/// left a process in the background (holding its output open) failed
/// after the timeout and was run again, and a command killed at its
/// timeout left what it started running.
#[tokio::test]
async fn endless_output_and_background_processes_are_bounded() {
    let s = shell_server("timeout: 2\ndelivery:\n  max-attempts: 1\n").await;
    let plugins = s.manage(Method::GET, "/plugin", None).await.json();
    let pid = plugins[0]["pid"].as_u64().expect("shell runs");
    // A marker no other test's process has in its command line.
    let marker = format!("sleep 47.{pid}");
    let commands = [
        (
            "loud",
            "seq 1 100000; head -c 200000000 /dev/zero".to_string(),
        ),
        ("background", "(sleep 30; echo late) & echo started".into()),
        ("group", format!("{marker} & sleep 40")),
    ];
    let id = run_tagged(&s, &commands).await;
    let o = outcomes(&s, id, 3).await;
    assert_eq!(o["loud"].0, "delivered", "{o:?}");
    assert_eq!(o["background"].0, "delivered", "{o:?}");
    assert_eq!(o["group"].0, "failed", "{o:?}");
    assert!(o["group"].1.contains("did not finish"), "{o:?}");
    // The start of the output is logged, then how much more there was.
    s.wait_log("command: started", Duration::from_secs(5)).await;
    assert_eq!(s.log_lines("command: 50 ").len(), 1, "{}", s.log_text());
    assert!(s.log_lines("command: 51 ").is_empty());
    assert!(
        s.log_lines("more bytes of stdout not logged").len() == 1,
        "{}",
        s.log_text()
    );
    let peak_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("the plugin's peak memory");
    assert!(peak_kib < 64 * 1024, "the plugin peaked at {peak_kib} KiB");
    // What the command killed at its timeout had started is gone too.
    poll_until(Duration::from_secs(5), async || {
        let left: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.trim_end() == marker)
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await;
}

/// What a pusher puts in an event cannot write a line of its own into the
/// server's log. Before, a command that failed with the message on its
/// stderr (as a `logger` or `mail` command does with a message it
/// refuses) had the server log the delivery's failure with the message's
/// line breaks in it: the text after one stood in the log as a line of
/// its own, timestamp, level and all, which journald and whatever reads
/// the log took for the server's.
#[tokio::test]
async fn a_message_cannot_forge_a_line_of_the_log() {
    let s = shell_server("delivery:\n  retry-base: 0.05\n  max-attempts: 1\n").await;
    let (id, addr) = s.new_addr().await;
    let command = "printf '%s\\n' \"$ROBOGER_MSG\" >&2; exit 3";
    s.endpoint(id, "shell", json!({"command": command})).await;
    let forged = "2026-01-01T00:00:00.000000Z ERROR roboger_server::store: forged";
    let msg = format!("first\n{forged}\rthen\r\n{forged} too");
    assert_status!(s.push(json!({"addr": addr, "msg": msg})).await, 202);
    s.wait_log("delivery failed for good", Duration::from_secs(20))
        .await;
    let log = s.log_text();
    let failed = s.log_lines("delivery failed for good");
    assert_eq!(failed.len(), 1, "{log}");
    assert!(
        failed[0].contains(&format!("first\\n{forged}\\rthen\\r\\n{forged} too")),
        "{log}"
    );
    for line in log.lines() {
        assert!(!line.starts_with(forged), "a forged line: {line:?}\n{log}");
        assert!(!line.contains('\r'), "a carriage return: {line:?}\n{log}");
    }
}
