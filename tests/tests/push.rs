//! `POST /push` end to end: routing rules, status codes, media, retries,
//! and nothing accepted and then lost, whether the plugin or the server
//! is killed. The plugin is the test plugin, which records every `send`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use roboger_tests::{
    Method, Resp, Server, ServerOptions, Value, assert_status, at_once, json, poll_every,
    poll_until, test_plugin_bin,
};

struct Rig {
    s: Server,
    rec: PathBuf,
    addr_id: i64,
    a: String,
}

async fn rig(yaml: &str) -> Rig {
    rig_with(yaml, ServerOptions::default()).await
}

/// [`rig`] on a server started with `opts` besides.
async fn rig_with(yaml: &str, opts: ServerOptions) -> Rig {
    let dir = tempfile::tempdir().unwrap().keep();
    let rec = dir.join("rec.jsonl");
    let s = Server::start_with(ServerOptions {
        yaml: format!("delivery:\n  retry-base: 0.05\n  retry-max: 0.5\n{yaml}"),
        plugins_yaml: format!(
            "- name: t\n  command: {}\n  env:\n    TEST_PLUGIN_RECORD: {}\n",
            test_plugin_bin().display(),
            rec.display()
        ),
        ..opts
    })
    .await;
    let addr = s.manage(Method::POST, "/addr", None).await.json();
    Rig {
        addr_id: addr["id"].as_i64().unwrap(),
        a: addr["a"].as_str().unwrap().to_string(),
        s,
        rec,
    }
}

impl Rig {
    /// An endpoint of plugin `t` with `config`, and one subscription per
    /// entry of `subs`.
    async fn endpoint(&self, config: Value, subs: &[Value]) -> i64 {
        let r = self
            .s
            .manage(
                Method::POST,
                &format!("/addr/{}/endpoint", self.addr_id),
                Some(json!({"plugin_name": "t", "config": config})),
            )
            .await;
        assert_status!(r, 201);
        let ep = r.json()["id"].as_i64().unwrap();
        for sub in subs {
            let r = self
                .s
                .manage(
                    Method::POST,
                    &format!("/addr/{}/endpoint/{ep}/subscription", self.addr_id),
                    Some(sub.clone()),
                )
                .await;
            assert_status!(r, 201);
        }
        ep
    }

    async fn push(&self, mut body: Value) -> Resp {
        if body.get("addr").is_none() {
            body["addr"] = json!(self.a);
        }
        self.s
            .request(Method::POST, "/push", None, &[], Some(body))
            .await
    }

    fn sends(&self) -> Vec<Value> {
        records(&self.rec)
    }

    /// The messages of the events delivered so far.
    fn delivered(&self) -> BTreeSet<String> {
        self.sends()
            .iter()
            .filter_map(|s| s["msg"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits until every event of `msgs` is delivered (panics after
    /// `timeout`, saying `after` what they were not).
    async fn wait_delivered(&self, msgs: &[String], timeout: Duration, after: &str) {
        poll_until(timeout, async || {
            let delivered = self.delivered();
            match msgs.iter().filter(|m| !delivered.contains(*m)).count() {
                0 => Ok(()),
                missing => Err(format!(
                    "{missing} of {} accepted events not delivered {after}",
                    msgs.len()
                )),
            }
        })
        .await
    }

    /// Waits until `n` sends are recorded (and a little more, to catch
    /// extra ones), then returns them.
    async fn wait_sends(&self, n: usize) -> Vec<Value> {
        poll_until(Duration::from_secs(20), async || match self.sends().len() {
            got if got >= n => Ok(()),
            got => Err(format!("only {got} of {n} sends arrived")),
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.sends()
    }

    async fn event(&self, id: &str) -> Value {
        let r = self
            .s
            .manage(
                Method::GET,
                &format!("/addr/{}/event/{id}", self.addr_id),
                None,
            )
            .await;
        assert_status!(r, 200);
        r.json()
    }

    /// Waits until every delivery of the event is in `state`.
    async fn wait_state(&self, id: &str, state: &str) -> Value {
        poll_until(Duration::from_secs(20), async || {
            let e = self.event(id).await;
            let ds = e["deliveries"].as_array().unwrap();
            match !ds.is_empty() && ds.iter().all(|d| d["state"] == state) {
                true => Ok(e),
                false => Err(format!("event never became {state}: {e}")),
            }
        })
        .await
    }
}

fn records(path: &Path) -> Vec<Value> {
    roboger_tests::json_lines(path)
        .into_iter()
        .filter(|v| v["method"] == "send")
        .collect()
}

/// Which endpoints (by their config's `name`) got the event `msg`.
fn got(sends: &[Value], msg: &str) -> BTreeSet<String> {
    sends
        .iter()
        .filter(|s| s["msg"] == msg)
        .map(|s| s["config"]["name"].as_str().unwrap().to_string())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn level_rules_wildcards_and_one_delivery_per_endpoint() {
    let r = rig("").await;
    for (name, level, m) in [
        ("e", 30, "e"),
        ("g", 30, "g"),
        ("gt", 30, "gt"),
        ("ge", 30, "ge"),
        ("l", 30, "l"),
        ("lt", 30, "lt"),
        ("le", 30, "le"),
    ] {
        r.endpoint(
            json!({"name": name}),
            &[json!({"level": level, "level_match": m})],
        )
        .await;
    }
    r.endpoint(
        json!({"name": "lab"}),
        &[json!({"location": "lab", "level": 10})],
    )
    .await;
    r.endpoint(
        json!({"name": "tag"}),
        &[json!({"tag": "disk", "level": 10})],
    )
    .await;
    r.endpoint(
        json!({"name": "bot"}),
        &[json!({"sender": "bot", "level": 10})],
    )
    .await;
    // Two matching subscriptions: still one delivery.
    r.endpoint(
        json!({"name": "twice"}),
        &[
            json!({"level": 10}),
            json!({"level": 20, "location": "lab"}),
        ],
    )
    .await;

    for (msg, level) in [("at20", 20), ("at30", 30), ("at40", 40)] {
        assert_status!(r.push(json!({"msg": msg, "level": level})).await, 202);
    }
    assert_status!(r.push(json!({"msg": "lab", "level": "debug", "location": "lab", "tag": "disk", "sender": "bot"})).await, 202);
    let sends = r.wait_sends(4 + 4 + 4 + 7).await;
    assert_eq!(got(&sends, "at20"), set(&["l", "lt", "le", "twice"]));
    assert_eq!(got(&sends, "at30"), set(&["e", "ge", "le", "twice"]));
    assert_eq!(got(&sends, "at40"), set(&["g", "gt", "ge", "twice"]));
    assert_eq!(
        got(&sends, "lab"),
        set(&["l", "lt", "le", "lab", "tag", "bot", "twice"])
    );
    assert_eq!(
        sends
            .iter()
            .filter(|s| s["config"]["name"] == "twice")
            .count(),
        4,
        "one per event"
    );
    assert_eq!(sends.len(), 4 + 4 + 4 + 7);
}

#[tokio::test]
async fn inactive_addr_endpoint_or_subscription() {
    let r = rig("").await;
    let on = r.endpoint(json!({"name": "on"}), &[json!({})]).await;
    let off = r.endpoint(json!({"name": "off"}), &[json!({})]).await;
    let subless = r.endpoint(json!({"name": "subless"}), &[json!({})]).await;
    let id = r.addr_id;
    assert_status!(
        r.s.manage(
            Method::PATCH,
            &format!("/addr/{id}/endpoint/{off}"),
            Some(json!({"active": 0}))
        )
        .await,
        200
    );
    let sub =
        r.s.manage(
            Method::GET,
            &format!("/addr/{id}/endpoint/{subless}/subscription"),
            None,
        )
        .await
        .json()[0]["id"]
            .as_i64()
            .unwrap();
    r.s.manage(
        Method::PATCH,
        &format!("/addr/{id}/endpoint/{subless}/subscription/{sub}"),
        Some(json!({"active": 0})),
    )
    .await;
    assert_status!(r.push(json!({"msg": "m1"})).await, 202);
    let sends = r.wait_sends(1).await;
    assert_eq!(got(&sends, "m1"), set(&["on"]));
    let _ = on;

    r.s.manage(
        Method::PATCH,
        &format!("/addr/{id}"),
        Some(json!({"active": 0})),
    )
    .await;
    let resp = r.push(json!({"msg": "m2"})).await;
    assert_status!(resp, 406);
    assert!(resp.text.contains("disabled"));
    // Renamed addresses route under their new name only.
    r.s.manage(
        Method::PATCH,
        &format!("/addr/{id}"),
        Some(json!({"active": 1})),
    )
    .await;
    let loc =
        r.s.manage(
            Method::POST,
            &format!("/addr/{id}"),
            Some(json!({"cmd": "change"})),
        )
        .await;
    let new_a = loc
        .header("location")
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    assert_status!(r.push(json!({"msg": "m3"})).await, 404);
    assert_status!(r.push(json!({"msg": "m3", "addr": new_a})).await, 202);
    r.wait_sends(2).await;
}

#[tokio::test]
async fn status_codes_and_field_forms() {
    let r = rig("push-max-media: 1000\n").await;
    r.endpoint(json!({"name": "x"}), &[json!({"level": 10})])
        .await;
    let bad = r.push(json!({"msg": "x", "colour": "red"})).await;
    assert_status!(bad, 400);
    assert!(bad.text.contains("colour"));
    assert_status!(
        r.s.request(
            Method::POST,
            "/push",
            None,
            &[],
            Some(json!({"msg": "no addr"}))
        )
        .await,
        400
    );
    assert_status!(r.push(json!({"msg": ["not", "text"]})).await, 400);
    let r404 = r.push(json!({"addr": "z".repeat(64)})).await;
    assert_status!(r404, 404);
    assert!(r404.text.contains("not found"));
    let raw =
        r.s.http
            .post(r.s.url("/push"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    // A header that is not ASCII text is a 400 naming it (not a 405).
    for name in ["content-type", "content-encoding", "x-roboger-hops"] {
        let value = reqwest::header::HeaderValue::from_bytes(b"\xffjson").expect("obs-text");
        let raw =
            r.s.http
                .post(r.s.url("/push"))
                .header(name, value)
                .body(json!({"addr": r.a, "msg": "odd header"}).to_string())
                .send()
                .await
                .unwrap();
        assert_eq!(raw.status().as_u16(), 400, "{name}");
        let text = raw.text().await.unwrap_or_default().to_lowercase();
        assert!(text.contains(name), "{name}: {text}");
    }
    // A compressed body is said to be so (not "not valid JSON"); one
    // that says it is not compressed is read.
    let gzipped =
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae\x05\x00\x43\xbf\xa6\xa3\x02\x00\x00\x00";
    for (encoding, body, status, said) in [
        (
            "gzip",
            gzipped.to_vec(),
            415,
            "the request body is gzip-encoded (Content-Encoding); send it uncompressed",
        ),
        (
            "Identity",
            json!({"addr": r.a, "msg": "identity"})
                .to_string()
                .into_bytes(),
            202,
            "",
        ),
    ] {
        let raw =
            r.s.http
                .post(r.s.url("/push"))
                .header("content-type", "application/json")
                .header("content-encoding", encoding)
                .body(body)
                .send()
                .await
                .unwrap();
        assert_eq!(raw.status().as_u16(), status, "{encoding}");
        assert_eq!(raw.text().await.unwrap_or_default(), said, "{encoding}");
    }
    let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 2000]);
    let over = r.push(json!({"msg": "big", "media": big})).await;
    assert_status!(over, 413);
    // The media is what is too large, not the body, which was read whole:
    // the connection stays open.
    assert_eq!(
        over.text,
        "media is larger than 1000 bytes (push-max-media)"
    );
    assert_eq!(over.header("connection"), None);
    let huge = "x".repeat(3 * 1024 * 1024);
    let raw =
        r.s.http
            .post(r.s.url("/push"))
            .body(huge)
            .send()
            .await
            .unwrap();
    assert_eq!(raw.status().as_u16(), 413);

    // Form bodies and query strings work as in the original; keywords is tag.
    let form =
        r.s.http
            .post(r.s.url("/push"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("addr={}&msg=form&level=warning&keywords=kw", r.a))
            .send()
            .await
            .unwrap();
    assert_eq!(form.status().as_u16(), 202);
    let q =
        r.s.http
            .post(r.s.url(&format!(
                "/push?addr={}&msg=query&level=e&sender=s1%40h&location=lab",
                r.a
            )))
            .send()
            .await
            .unwrap();
    assert_eq!(q.status().as_u16(), 202);
    let sends = r.wait_sends(3).await;
    assert!(sends.iter().any(|s| s["msg"] == "identity"), "{sends:?}");
    let form = sends.iter().find(|s| s["msg"] == "form").unwrap();
    assert_eq!(
        (form["level"].as_u64(), form["tag"].as_str()),
        (Some(30), Some("kw"))
    );
    let q = sends.iter().find(|s| s["msg"] == "query").unwrap();
    assert_eq!(q["level_name"], "ERROR");
    assert_eq!(q["formatted_subject"], "ERROR s1@lab");
    assert_eq!(q["event_id"].as_str().unwrap().len(), 36);
    assert_eq!(q["addr"], r.a.as_str());
    assert_eq!(q["addr_id"], r.addr_id);
}

#[tokio::test]
async fn media_round_trip() {
    let r = rig("").await;
    r.endpoint(json!({"name": "m"}), &[json!({})]).await;
    let bytes: Vec<u8> = (0..=255).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    assert_status!(
        r.push(
            json!({"msg": "pic", "subject": "s", "media": b64, "media_fname": "/tmp/dir/pic.bin"})
        )
        .await,
        202
    );
    assert_status!(
        r.push(json!({"msg": "broken", "media": "%%% not base64 %%%", "media_fname": "x"}))
            .await,
        202
    );
    let sends = r.wait_sends(2).await;
    let pic = sends.iter().find(|s| s["msg"] == "pic").unwrap();
    assert_eq!(pic["media"], json!(bytes));
    assert_eq!(pic["media_encoded"], b64.as_str());
    assert_eq!(pic["media_fname"], "pic.bin");
    let broken = sends.iter().find(|s| s["msg"] == "broken").unwrap();
    assert_eq!(
        (broken["media"].clone(), broken["media_encoded"].clone()),
        (Value::Null, Value::Null)
    );
    // The events API shows the event, its media size and delivery.
    let list =
        r.s.manage(
            Method::GET,
            &format!("/addr/{}/event?limit=1", r.addr_id),
            None,
        )
        .await
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let e = r
        .wait_state(pic["event_id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(e["media_size"], 256);
    assert_eq!(e["deliveries"][0]["attempts"], 1);
}

/// A field sent twice is taken where the original (flask-restx over
/// werkzeug) took it: the first of a form's or a query string's, the
/// query string's over a form's, a JSON body's over the query string's.
#[tokio::test]
async fn a_field_sent_twice_is_taken_as_the_original_took_it() {
    let r = rig("").await;
    r.endpoint(json!({"name": "twice"}), &[json!({"level": 10})])
        .await;
    let a = &r.a;
    let form = "application/x-www-form-urlencoded";
    let cases: [(String, Option<&str>, String, &str); 5] = [
        (
            String::new(),
            Some(form),
            format!("addr={a}&msg=first&msg=second&tag=1"),
            "first",
        ),
        (
            "?msg=query".into(),
            Some(form),
            format!("addr={a}&msg=form&tag=2"),
            "query",
        ),
        (
            format!("?addr={a}&msg=q1&msg=q2&tag=3"),
            None,
            String::new(),
            "q1",
        ),
        (
            "?msg=query".into(),
            Some("application/json"),
            format!(r#"{{"addr": "{a}", "msg": "json", "tag": "4"}}"#),
            "json",
        ),
        (
            "?msg=query&tag=5".into(),
            Some("multipart/form-data; boundary=b"),
            format!(
                "--b\r\nContent-Disposition: form-data; name=\"addr\"\r\n\r\n{a}\r\n--b\r\nContent-Disposition: form-data; name=\"msg\"\r\n\r\nmulti\r\n--b--\r\n"
            ),
            "query",
        ),
    ];
    for (query, content_type, body, _) in &cases {
        let mut req = r.s.http.post(r.s.url(&format!("/push{query}")));
        if let Some(t) = content_type {
            req = req.header("content-type", *t);
        }
        let resp = req.body(body.clone()).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 202, "{query} {body}");
    }
    let sends = r.wait_sends(cases.len()).await;
    for (i, (query, _, body, msg)) in cases.iter().enumerate() {
        let tag = (i + 1).to_string();
        let sent = sends.iter().find(|s| s["tag"] == tag.as_str());
        assert_eq!(
            sent.map(|s| s["msg"].clone()),
            Some(json!(msg)),
            "{query} {body}: {sends:?}"
        );
    }
}

/// A multipart form push, as `curl -F` sends it: the original took its
/// text fields, and its file in `media` is the event's media, raw.
#[tokio::test]
async fn multipart_form_pushes() {
    let r = rig("push-max-media: 1000\n").await;
    r.endpoint(json!({"name": "mp"}), &[json!({"level": 10})])
        .await;
    let post = |form: reqwest::multipart::Form| {
        let req = r.s.http.post(r.s.url("/push")).multipart(form);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap_or_default())
        }
    };
    let text = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .fold(reqwest::multipart::Form::new(), |f, (k, v)| {
                f.text(k.to_string(), v.to_string())
            })
    };
    let file = |bytes: Vec<u8>, name: &str| {
        reqwest::multipart::Part::bytes(bytes).file_name(name.to_string())
    };

    // Text fields only, as a script written for the original sends them.
    let (status, said) = post(text(&[
        ("addr", &r.a),
        ("msg", "from a form"),
        ("level", "warning"),
        ("keywords", "kw"),
    ]))
    .await;
    assert_eq!(status, 202, "{said}");
    // A file in `media` is the media itself, named by its file name...
    let bytes: Vec<u8> = (0..=255).collect();
    let (status, said) = post(
        text(&[("addr", &r.a), ("msg", "a file")]).part("media", file(bytes.clone(), "/d/pic.bin")),
    )
    .await;
    assert_eq!(status, 202, "{said}");
    // ... unless `media_fname` names it.
    let (status, said) = post(
        text(&[
            ("addr", &r.a),
            ("msg", "renamed"),
            ("media_fname", "shot.png"),
        ])
        .part("media", file(vec![1, 2, 3], "upload.bin")),
    )
    .await;
    assert_eq!(status, 202, "{said}");

    let sends = r.wait_sends(3).await;
    let form = sends.iter().find(|s| s["msg"] == "from a form").unwrap();
    assert_eq!(
        (form["level"].as_u64(), form["tag"].as_str(), &form["media"]),
        (Some(30), Some("kw"), &Value::Null)
    );
    let pic = sends.iter().find(|s| s["msg"] == "a file").unwrap();
    assert_eq!(pic["media"], json!(bytes));
    assert_eq!(pic["media_fname"], "pic.bin");
    let renamed = sends.iter().find(|s| s["msg"] == "renamed").unwrap();
    assert_eq!(
        (&renamed["media"], &renamed["media_fname"]),
        (&json!([1, 2, 3]), &json!("shot.png"))
    );

    // What is wrong is said, as for JSON.
    let (status, said) = post(text(&[("addr", &r.a), ("bogus", "1")])).await;
    assert_eq!(
        (status, said.contains("unknown field \"bogus\"")),
        (400, true),
        "{said}"
    );
    let (status, said) = post(text(&[("msg", "no address")])).await;
    assert_eq!((status, said.contains("\"addr\"")), (400, true), "{said}");
    let (status, said) =
        post(text(&[("addr", &r.a), ("media", "aGk=")]).part("media", file(vec![1], "x"))).await;
    assert_eq!(
        (status, said.contains("both as a file")),
        (400, true),
        "{said}"
    );
    let (status, said) = post(
        text(&[("addr", &r.a)])
            .part("media", file(vec![1], "a"))
            .part("media", file(vec![2], "b")),
    )
    .await;
    assert_eq!(
        (status, said.contains("more than one file")),
        (400, true),
        "{said}"
    );
    let (status, _) = post(text(&[("addr", &r.a)]).part("media", file(vec![7; 2000], "big"))).await;
    assert_eq!(status, 413);
    let broken =
        r.s.http
            .post(r.s.url("/push"))
            .header("content-type", "multipart/form-data; boundary=XX")
            .body(format!(
                "--XX\r\nContent-Disposition: form-data; name=\"addr\"\r\n\r\n{}",
                r.a
            ))
            .send()
            .await
            .unwrap();
    assert_eq!(broken.status().as_u16(), 400);
    let said = broken.text().await.unwrap_or_default();
    assert!(said.contains("broken multipart form"), "{said}");
    // None of the refused pushes reached the plugin.
    assert_eq!(r.wait_sends(3).await.len(), 3);
}

/// After an outage, an endpoint's failed deliveries are tried again with
/// one command, however many (more than one chunk of the update here);
/// another endpoint's stay failed.
#[tokio::test]
async fn an_endpoints_failed_deliveries_are_retried_with_one_command() {
    let r = rig("  max-attempts: 1\n").await;
    let back = r
        .endpoint(json!({"name": "back", "fail_times": 1}), &[json!({})])
        .await;
    let down = r
        .endpoint(json!({"name": "down", "fail": "still down"}), &[json!({})])
        .await;
    const EVENTS: usize = 510;
    let pushes = (0..EVENTS).map(|i| r.push(json!({"msg": format!("m{i}")})));
    let answers = at_once(pushes, 32).await;
    for p in answers {
        assert_status!(p, 202);
    }
    let n = EVENTS as u64;
    r.s.endpoint_settles(r.addr_id, back, 0, n).await;
    r.s.endpoint_settles(r.addr_id, down, 0, n).await;
    let retry = |ep: i64, body: Value| {
        let path = format!("/addr/{}/endpoint/{ep}", r.addr_id);
        let s = &r.s;
        async move { s.manage(Method::POST, &path, Some(body)).await }
    };
    let done = retry(back, json!({"cmd": "retry"})).await;
    assert_status!(done, 200);
    assert_eq!(done.json(), json!({"retried": n}));
    r.s.endpoint_settles(r.addr_id, back, n, 0).await;
    r.s.endpoint_settles(r.addr_id, down, 0, n).await;
    // Nothing left to retry; a field retry does not take; a command it
    // does not know says which it does.
    assert_eq!(
        retry(back, json!({"cmd": "retry"})).await.json(),
        json!({"retried": 0})
    );
    let extra = retry(back, json!({"cmd": "retry", "target": down})).await;
    assert_status!(extra, 400);
    assert!(
        extra.text.contains("unknown field \"target\""),
        "{}",
        extra.text
    );
    let unknown = retry(back, json!({"cmd": "resend"})).await;
    assert_status!(unknown, 405);
    assert!(
        unknown.text.contains("known: copysub, retry"),
        "{}",
        unknown.text
    );
}

/// A burst to an address with many endpoints: far more deliveries come
/// back from the plugin than the writer writes per commit, and than the
/// queues between writer and dispatcher hold (8,192 each), while the
/// writer still hands new ones over. The writer does not wait on the
/// dispatcher while the dispatcher waits on it: every event accepted is
/// delivered to every endpoint, and the server goes on accepting. (A
/// push may be answered 503, not stored, while the writer catches up:
/// that is the backpressure a client is told to retry on.)
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_to_many_endpoints_is_all_delivered() {
    const ENDPOINTS: usize = 64;
    const EVENTS: usize = 512;
    let r = rig("").await;
    let mut endpoints = Vec::new();
    for _ in 0..ENDPOINTS {
        endpoints.push(r.endpoint(json!({}), &[json!({})]).await);
    }
    let pushes = (0..EVENTS).map(|i| r.push(json!({"msg": format!("m{i}")})));
    let answers = at_once(pushes, 256).await;
    let mut accepted = 0;
    for p in answers {
        if p.status == 503 {
            assert!(p.text.contains("could not be stored in time"), "{}", p.text);
            continue;
        }
        assert_status!(p, 202);
        accepted += 1;
    }
    assert!(accepted > 0);
    for &ep in &endpoints {
        r.s.endpoint_settles(r.addr_id, ep, accepted, 0).await;
    }
    assert_status!(r.push(json!({"msg": "after"})).await, 202);
    for &ep in &endpoints {
        r.s.endpoint_settles(r.addr_id, ep, accepted + 1, 0).await;
    }
    assert_eq!(r.sends().len(), ENDPOINTS * (accepted as usize + 1));
}

/// PostgreSQL: the group commit's plan, made once while the database is
/// new, stays quick however the delivery table fills after it and
/// whether or not autovacuum has looked at it since. Plans that were
/// right for a few deliveries joined each outcome against every pending
/// delivery of this node (here 200,000 parked behind the server's back),
/// or against every delivery of its endpoint (here a history of 100,000):
/// a commit of a burst's outcomes then ran past its statement timeout at
/// every try, those deliveries were left pending (and later made again)
/// and any push in such a commit was refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_commit_stays_quick_once_a_new_database_fills() {
    if !roboger_tests::on_postgres() {
        eprintln!("PostgreSQL's plan cache: nothing to test on this database");
        return;
    }
    let r = rig("").await;
    // As before autovacuum first analyzes the filled table (it looks once
    // a minute); done first, as a change of the table plans it again.
    let db = roboger_tests::DbClient::of(&r.s.db);
    db.query("ALTER TABLE delivery SET (autovacuum_enabled = false)");
    let ep = r.endpoint(json!({"slow": 300}), &[json!({})]).await;
    let parked = r.endpoint(json!({}), &[]).await;
    // Commits with an outcome each, while the tables are nearly empty:
    // more than the five after which PostgreSQL may keep one plan.
    for i in 1..=8 {
        assert_status!(r.push(json!({"msg": format!("warm {i}")})).await, 202);
        r.s.endpoint_settles(r.addr_id, ep, i, 0).await;
    }
    const HISTORY: u64 = 100_000;
    db.query(&format!(
        "INSERT INTO delivery (event_id, endpoint_id, state, attempts, next_at, \
         created, updated) \
         SELECT lpad(i::text, 36, 'h'), {ep}, 'delivered', 1, now(), now(), now() \
         FROM generate_series(1, {HISTORY}) AS i"
    ));
    db.query(&format!(
        "INSERT INTO delivery (event_id, endpoint_id, state, attempts, next_at, \
         lease_until, leased_by, created, updated) \
         SELECT lpad(i::text, 36, 'x'), {parked}, 'pending', 0, now() + interval '1 day', \
         now() + interval '1 day', (SELECT instance FROM node LIMIT 1), now(), now() \
         FROM generate_series(1, 200000) AS i"
    ));
    // PostgreSQL's own count of the table's updates, and of the rows read
    // by walking the whole table rather than by an index.
    let counts = || -> (u64, u64) {
        let row = db.query(
            "SELECT n_tup_upd || ' ' || seq_tup_read FROM pg_stat_user_tables \
             WHERE relname = 'delivery'",
        );
        let mut n = row
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        (n.next().unwrap_or(0), n.next().unwrap_or(0))
    };
    let (updated_before, walked_before) = counts();
    // A burst whose outcomes come back together, for one commit.
    const BURST: u64 = 512;
    let pushes = (0..BURST).map(|i| r.push(json!({"msg": format!("burst {i}")})));
    for p in futures_util::future::join_all(pushes).await {
        assert_status!(p, 202);
    }
    r.s.endpoint_settles(r.addr_id, ep, HISTORY + 8 + BURST, 0)
        .await;
    let failed = r.s.log_lines("cannot write to the database");
    assert!(failed.is_empty(), "{failed:?}");
    // Each outcome found by index: once PostgreSQL has counted the burst's
    // outcomes (a backend reports its counts when idle, within seconds),
    // no commit has walked the table, which now holds 300,000 rows.
    // Each look starts a psql.
    let walked = poll_every(
        Duration::from_millis(250),
        Duration::from_secs(30),
        async || {
            let (updated, walked) = counts();
            match updated >= updated_before + BURST {
                true => Ok(walked.saturating_sub(walked_before)),
                false => Err(format!(
                    "{} of {BURST} outcomes counted",
                    updated.saturating_sub(updated_before)
                )),
            }
        },
    )
    .await;
    assert!(
        walked < HISTORY,
        "the commits walked {walked} rows of the table"
    );
}

#[tokio::test]
async fn failures_are_retried_then_delivered_or_given_up() {
    let r = rig("").await;
    let flaky = r
        .endpoint(
            json!({"name": "flaky", "fail_times": 2}),
            &[json!({"tag": "flaky"})],
        )
        .await;
    let _dead = r
        .endpoint(
            json!({"name": "dead", "fail": "SMTP said no"}),
            &[json!({"tag": "dead"})],
        )
        .await;
    assert_status!(r.push(json!({"msg": "f", "tag": "flaky"})).await, 202);
    let first = r.wait_sends(1).await;
    let id = first[0]["event_id"].as_str().unwrap().to_string();
    let e = r.wait_state(&id, "delivered").await;
    assert_eq!(e["deliveries"][0]["attempts"], 3, "{e}");
    assert_eq!(e["deliveries"][0]["endpoint_id"], flaky);
    assert_eq!(
        r.sends()
            .iter()
            .filter(|s| s["event_id"] == id.as_str())
            .count(),
        3
    );

    assert_status!(r.push(json!({"msg": "d", "tag": "dead"})).await, 202);
    let dead_id = poll_until(Duration::from_secs(20), async || {
        match r.sends().iter().find(|s| s["msg"] == "d") {
            Some(s) => Ok(s["event_id"].as_str().unwrap().to_string()),
            None => Err("the event was never sent".to_string()),
        }
    })
    .await;
    let e = r.wait_state(&dead_id, "failed").await;
    let d = &e["deliveries"][0];
    assert_eq!(d["attempts"], 10, "default max-attempts: {e}");
    assert_eq!(d["last_error"], "SMTP said no");
    // A failed delivery can be retried by hand.
    assert_status!(
        r.s.manage(
            Method::POST,
            &format!("/addr/{}/event/{dead_id}", r.addr_id),
            Some(json!({"cmd": "retry"}))
        )
        .await,
        204
    );
    poll_until(Duration::from_secs(10), async || {
        let sends = r.sends();
        match sends
            .iter()
            .filter(|s| s["event_id"] == dead_id.as_str())
            .count()
        {
            11.. => Ok(()),
            _ => Err("the retried delivery was not attempted".to_string()),
        }
    })
    .await;
    assert_status!(
        r.s.manage(
            Method::POST,
            &format!("/addr/{}/event/{dead_id}", r.addr_id),
            Some(json!({"cmd": "x"}))
        )
        .await,
        405
    );
    assert_status!(
        r.s.manage(
            Method::GET,
            &format!("/addr/{}/event/nope", r.addr_id),
            None
        )
        .await,
        404
    );
}

#[tokio::test]
async fn a_plugin_killed_with_deliveries_in_flight_delivers_them_all() {
    let r = rig("").await;
    r.endpoint(json!({"name": "slow", "slow": 300}), &[json!({})])
        .await;
    let msgs: Vec<String> = (0..20).map(|i| format!("e{i}")).collect();
    for m in &msgs {
        assert_status!(r.push(json!({"msg": m})).await, 202);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pid = r.s.manage(Method::GET, "/plugin", None).await.json()[0]["pid"]
        .as_u64()
        .unwrap();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    r.wait_delivered(
        &msgs,
        Duration::from_secs(20),
        "after the plugin was killed",
    )
    .await;
}

#[tokio::test]
async fn a_server_killed_after_accepting_delivers_everything_after_restart() {
    let mut r = rig("").await;
    r.endpoint(json!({"name": "slow", "slow": 100}), &[json!({})])
        .await;
    let msgs: Vec<String> = (0..60).map(|i| format!("e{i}")).collect();
    for m in &msgs {
        assert_status!(r.push(json!({"msg": m})).await, 202);
    }
    // SIGKILL right after the 202s: most deliveries are still pending.
    r.s.kill_and_restart();
    r.wait_delivered(&msgs, Duration::from_secs(30), "after the restart")
        .await;
}

/// The server's SQLite database on a file system of its own, 2 MiB of
/// tmpfs mounted in a mount namespace of the server's (`unshare`, as a
/// user namespace's root where the tests are not run as root); `None`,
/// saying why, where that cannot be made.
fn on_a_small_file_system() -> Option<(ServerOptions, PathBuf)> {
    let dir = tempfile::tempdir().unwrap().keep().join("small");
    std::fs::create_dir(&dir).unwrap();
    let unshare = |script: &str| -> Vec<String> {
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script]
            .iter()
            .map(|s| s.to_string())
            .chain([dir.display().to_string()])
            .collect()
    };
    let mount = "mount -t tmpfs -o size=2m tmpfs \"$0\"";
    let probe = unshare(mount);
    let ok = std::process::Command::new(&probe[0])
        .args(&probe[1..])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("ROBOGER_TEST_REQUIRE_ALL").is_none(),
            "cannot mount a tmpfs in a mount namespace (unshare --mount --map-root-user)"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs in a mount namespace here");
        return None;
    }
    let opts = ServerOptions {
        db: Some(format!("sqlite:///{}/roboger.db", dir.display())),
        wrapper: unshare(&format!("{mount} && exec \"$@\"")),
        ..Default::default()
    };
    Some((opts, dir))
}

/// A full disk refuses pushes (503, nothing stored) and loses none it
/// accepted: every 202 is delivered once there is room again, the
/// server goes on accepting without a restart, and what the management
/// API answered as done, then and after, is kept.
#[tokio::test]
async fn a_full_disk_refuses_pushes_and_loses_none_it_accepted() {
    if roboger_tests::on_postgres() || roboger_tests::on_mysql() {
        return; // the server's own file system matters on SQLite only
    }
    let Some((opts, dir)) = on_a_small_file_system() else {
        return;
    };
    let r = rig_with("", opts).await;
    r.endpoint(json!({"name": "n"}), &[json!({})]).await;
    // The test sees the server's tmpfs through its root in /proc. It
    // fills all of it, then frees 512 KiB: room for some pushes.
    let inside = PathBuf::from(format!("/proc/{}/root", r.s.pid())).join(
        dir.strip_prefix("/")
            .expect("an absolute temporary directory"),
    );
    let filler = inside.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("the filler, inside");
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let len = f.metadata().expect("metadata").len();
        f.set_len(len.saturating_sub(512 * 1024)).expect("truncate");
    }
    let body = "x".repeat(1000);
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    let mut refused_in_a_row = 0;
    for i in 0..3000 {
        let msg = format!("{i} {body}");
        let resp = r.push(json!({"msg": msg})).await;
        match resp.status.as_u16() {
            202 => {
                accepted.push(msg);
                refused_in_a_row = 0;
            }
            503 => {
                assert!(
                    resp.text.contains("cannot store the event"),
                    "{}",
                    resp.text
                );
                refused.push(msg);
                refused_in_a_row += 1;
                if refused_in_a_row == 5 {
                    break;
                }
            }
            other => panic!("push {i} on a full disk: {other} {}", resp.text),
        }
    }
    assert!(
        !accepted.is_empty() && refused_in_a_row == 5,
        "{} accepted, {} refused: the disk never filled",
        accepted.len(),
        refused.len()
    );
    // A management write on the full disk: refused, or kept.
    let during = r.s.manage(Method::POST, "/addr", None).await;
    assert!(
        [201, 503].contains(&during.status.as_u16()),
        "{} {}",
        during.status,
        during.text
    );
    // Room again: the same server accepts, without a restart.
    std::fs::remove_file(&filler).expect("remove the filler");
    poll_until(Duration::from_secs(20), async || {
        let resp = r.push(json!({"msg": "after"})).await;
        if resp.status == 202 {
            return Ok(());
        }
        assert_status!(resp, 503);
        Err("still refused with room again".to_string())
    })
    .await;
    accepted.push("after".into());
    // What the management API answers as done is kept, a conflict's
    // rollback first: a transaction SQLite rolled back by itself on the
    // full disk left no connection that commits nothing.
    let other = r.s.manage(Method::POST, "/addr", None).await;
    assert_status!(other, 201);
    let conflict =
        r.s.manage(
            Method::POST,
            &format!("/addr/{}", r.addr_id),
            Some(json!({"cmd": "change", "to": other.json()["a"]})),
        )
        .await;
    assert_status!(conflict, 409);
    let made = r.s.manage(Method::POST, "/addr", None).await;
    assert_status!(made, 201);
    let mut kept = vec![
        r.addr_id,
        other.json()["id"].as_i64().unwrap(),
        made.json()["id"].as_i64().unwrap(),
    ];
    if during.status == 201 {
        kept.push(during.json()["id"].as_i64().unwrap());
    }
    kept.sort_unstable();
    // Every accepted event is delivered; no refused one ever is.
    r.wait_delivered(&accepted, Duration::from_secs(30), "with room again")
        .await;
    // Exactly the addresses answered 201 exist: a 503 made none.
    let listed = r.s.manage(Method::GET, "/addr", None).await.json();
    let mut ids: Vec<i64> = listed
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {listed}"))
        .iter()
        .filter_map(|a| a["id"].as_i64())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, kept, "{listed}");
    let delivered = r.delivered();
    assert!(
        refused.iter().all(|m| !delivered.contains(m)),
        "a refused push was delivered"
    );
    let log = r.s.log_text();
    assert!(log.contains("database or disk is full"), "{log}");
}

/// A push counted against its address's limits meets the database's
/// error in its own handler: during an outage, or on a full disk, each
/// wrote an ERROR line (1,800 a second measured on a full disk). Those
/// lines share a budget of 600 a minute, and every such request is
/// counted in /metrics. Here the database refuses every count.
#[tokio::test]
async fn pushes_failed_on_a_database_error_have_600_lines_a_minute() {
    let r = rig("limits:\n  period: day\n").await;
    assert_status!(r.push(json!({"msg": "counted"})).await, 202);
    r.s.db_client().refuse_updates("addr_limit", "1 = 1");
    let pushes = (0..1000).map(|i| r.push(json!({"msg": format!("refused {i}")})));
    let statuses: Vec<u16> = at_once(pushes, 16)
        .await
        .iter()
        .map(|p| p.status.as_u16())
        .collect();
    assert!(statuses.iter().all(|&st| st == 503), "{statuses:?}");
    let logged = r.s.log_lines("api::error: database error");
    assert_eq!(logged.len(), 600, "{}", r.s.log_text());
    assert!(logged[0].contains("refused by the test"), "{}", logged[0]);
    assert_eq!(
        r.s.log_lines(
            "600 lines of requests failed on a database error logged in a minute: the rest \
             of the minute's are not, but counted (each is answered 503 and counted in \
             roboger_request_database_errors_total)"
        )
        .len(),
        1
    );
    let m = r.s.metrics().await;
    assert_eq!(
        m.get("roboger_request_database_errors_total"),
        Some(&1000.0)
    );
    assert_eq!(
        m.get("roboger_database_error_log_dropped_total"),
        Some(&400.0)
    );
}

/// A push counted against its address's limits, then not stored (the
/// database refuses its event: answered 503), is taken back where it was
/// counted, so a sender that sends it again is not counted twice for one
/// event: of `lim_c` 2, two more are taken. Where `counted` says.
async fn a_push_not_stored_is_taken_back(yaml: &str, counted: impl Fn(&Rig) -> Option<String>) {
    let r = rig(yaml).await;
    let patched =
        r.s.manage(
            Method::PATCH,
            &format!("/addr/{}", r.addr_id),
            Some(json!({"lim_c": 2})),
        )
        .await;
    assert_status!(patched, 200);
    let db = r.s.db_client();
    db.refuse_inserts("event", "NEW.msg = 'not stored'");
    assert_status!(r.push(json!({"msg": "not stored"})).await, 503);
    db.allow_writes("event");
    // The refund runs beside the answer.
    poll_until(Duration::from_secs(10), async || match counted(&r) {
        Some(c) if c != "0" => Err(format!("{c} counted")),
        _ => Ok(()),
    })
    .await;
    assert_status!(r.push(json!({"msg": "sent again"})).await, 202);
    assert_status!(r.push(json!({"msg": "another"})).await, 202);
    assert_status!(r.push(json!({"msg": "one too many"})).await, 429);
}

#[tokio::test]
async fn a_push_not_stored_is_not_counted_against_its_limits() {
    a_push_not_stored_is_taken_back("limits:\n  period: day\n", |r| {
        Some(r.s.db_client().query(&format!(
            "SELECT count FROM addr_limit WHERE addr_id = {}",
            r.addr_id
        )))
    })
    .await;
}

#[tokio::test]
async fn a_push_not_stored_is_not_counted_in_redis() {
    let Some(redis) = roboger_tests::RedisServer::start() else {
        return;
    };
    let yaml = format!(
        "limits:\n  period: day\n  redis:\n    host: '127.0.0.1:{}'\n",
        redis.port
    );
    a_push_not_stored_is_taken_back(&yaml, |r| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let key = format!("roboger:lim:{}:{}", r.addr_id, now - now % 86_400);
        redis.command(&["HGET", &key, "c"])
    })
    .await;
}

#[tokio::test]
async fn limits_with_the_reserve_and_windows() {
    let r = rig("limits:\n  period: 2\n  reserve: 20\n").await;
    r.endpoint(json!({"name": "x"}), &[json!({"level": 10})])
        .await;
    let id = r.addr_id;
    assert_status!(
        r.s.manage(
            Method::PATCH,
            &format!("/addr/{id}"),
            Some(json!({"lim_c": 5}))
        )
        .await,
        200
    );
    // Wait for the start of a fresh 2-second window, so the test does not
    // straddle two.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(
        2000 - (now.as_millis() % 2000) as u64 + 50,
    ))
    .await;
    // 20% of 5 is kept for WARNING and above: 4 INFO messages pass.
    for i in 0..4 {
        assert_status!(r.push(json!({"msg": format!("i{i}")})).await, 202);
    }
    let over = r.push(json!({"msg": "i4"})).await;
    assert_status!(over, 429);
    assert!(over.text.contains("reserved for WARNING"), "{}", over.text);
    // It says when the window ends: within its 2 seconds, at least one.
    let retry = |over: &Resp| {
        over.header("retry-after")
            .map(|v| v.parse::<u64>().unwrap())
    };
    assert!(matches!(retry(&over), Some(1..=2)), "{:?}", over.headers);
    assert!(
        over.text.contains("limited by 5 per 2 seconds"),
        "{}",
        over.text
    );
    assert_status!(r.push(json!({"msg": "w", "level": "warning"})).await, 202);
    let over = r.push(json!({"msg": "w2", "level": "critical"})).await;
    assert_status!(over, 429);
    assert!(
        over.text.contains("Limit has been reached"),
        "{}",
        over.text
    );
    // reset-addr-limits, then a real window: both let messages through again.
    assert_status!(
        r.s.manage(
            Method::POST,
            "/core",
            Some(json!({"cmd": "reset-addr-limits"}))
        )
        .await,
        204
    );
    assert_status!(r.push(json!({"msg": "after reset"})).await, 202);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for i in 0..4 {
        assert_status!(r.push(json!({"msg": format!("n{i}")})).await, 202);
    }
    // The size limit counts request bytes.
    assert_status!(
        r.s.manage(
            Method::PATCH,
            &format!("/addr/{id}"),
            Some(json!({"lim_c": 100, "lim_s": 2000}))
        )
        .await,
        200
    );
    assert_status!(
        r.s.manage(
            Method::POST,
            "/core",
            Some(json!({"cmd": "reset-addr-limits"}))
        )
        .await,
        204
    );
    let over = r
        .push(json!({"msg": "x".repeat(2500), "level": "error"}))
        .await;
    assert_status!(over, 429);
    assert!(over.text.contains("2000 bytes"), "{}", over.text);
    // No window would take a push larger than the limit: no Retry-After.
    assert_eq!(retry(&over), None);
    assert_status!(r.push(json!({"msg": "small"})).await, 202);
}

#[tokio::test]
async fn pyrpush_pushes_an_event_a_plugin_receives() {
    let Some(python) = roboger_tests::venv_python("pyrpush") else {
        return;
    };
    let r = rig("").await;
    r.endpoint(json!({"name": "x"}), &[json!({"level": 10})])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("push.ini");
    std::fs::write(
        &ini,
        format!(
            "[roboger]\npush = {}\naddr = {}\nsender = bot@host\nlocation = lab\n",
            r.s.base, r.a
        ),
    )
    .unwrap();
    let media = dir.path().join("pic.bin");
    std::fs::write(&media, [1u8, 2, 3, 250]).unwrap();
    let script = format!(
        "import pyrpush\nc = pyrpush.Client(ini_file={ini:?})\nassert c.push('hello from pyrpush', subject='subj', level='warning', tag='t1', media_file={media:?})\n",
        ini = ini.display().to_string(),
        media = media.display().to_string()
    );
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyrpush failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sends = r.wait_sends(1).await;
    let s = &sends[0];
    assert_eq!(s["msg"], "hello from pyrpush");
    assert_eq!(s["formatted_subject"], "WARNING bot@lab: subj");
    assert_eq!(
        (s["tag"].as_str(), s["level"].as_u64()),
        (Some("t1"), Some(30))
    );
    assert_eq!(s["media"], json!([1, 2, 3, 250]));
    assert_eq!(s["media_fname"], "pic.bin");
}

#[tokio::test]
async fn old_events_are_cleaned_up_and_cleanup_runs_periodically() {
    let r = rig("event-retention: 1\ncleanup-interval: 1\n").await;
    r.endpoint(json!({"name": "x"}), &[json!({})]).await;
    assert_status!(r.push(json!({"msg": "old"})).await, 202);
    let id = r.wait_sends(1).await[0]["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    r.wait_state(&id, "delivered").await;
    // Within a few periodic cleanups the delivered event is past its
    // retention and gone, and the plugin's cleanup has run.
    poll_until(Duration::from_secs(10), async || {
        let gone =
            r.s.manage(
                Method::GET,
                &format!("/addr/{}/event/{id}", r.addr_id),
                None,
            )
            .await
            .status
            .as_u16()
                == 404;
        let cleaned = std::fs::read_to_string(&r.rec)
            .unwrap_or_default()
            .contains("\"cleanup\"");
        match gone && cleaned {
            true => Ok(()),
            false => Err(format!("event gone: {gone}, plugin cleanup ran: {cleaned}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_concurrent_burst_to_many_endpoints_is_committed_and_delivered() {
    let r = std::sync::Arc::new(rig("").await);
    for i in 0..30 {
        r.endpoint(json!({"name": format!("ep{i}")}), &[json!({})])
            .await;
    }
    // 200 pushes at once: group commits of many events, each with 30
    // deliveries, beyond any one statement's parameter limit.
    let mut pushes = Vec::new();
    for i in 0..200 {
        let r = r.clone();
        pushes.push(tokio::spawn(async move {
            r.push(json!({"msg": format!("b{i}")}))
                .await
                .status
                .as_u16()
        }));
    }
    for p in pushes {
        assert_eq!(p.await.unwrap(), 202);
    }
    let sends = r.wait_sends(6000).await;
    let pairs: BTreeSet<(String, String)> = sends
        .iter()
        .map(|s| {
            (
                s["msg"].as_str().unwrap().to_string(),
                s["config"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(pairs.len(), 6000, "every event reached every endpoint");
}

/// Text in the character set its sender declares, or in Windows-1252
/// when it declares none and is not UTF-8 (as Windows PowerShell 5.1
/// sends a form or JSON), arrives as sent: `café`, not `caf\u{fffd}`
/// (the query string and form were altered so) nor a 400 (the JSON and
/// multipart were refused). A JSON body may open with a byte order mark;
/// a charset the server does not know is a 400 naming it.
#[tokio::test]
async fn text_in_a_legacy_charset_arrives_as_sent() {
    let r = rig("").await;
    r.endpoint(json!({"name": "all"}), &[json!({})]).await;
    let push = async |query: &str, content_type: Option<&str>, body: Vec<u8>| {
        let mut req =
            r.s.http
                .post(r.s.url(&format!("/push?addr={}{query}", r.a)));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.body(body).send().await.expect("push");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    };
    let form = Some("application/x-www-form-urlencoded");
    let multipart = |part_type: &str, text: &[u8]| {
        let mut b = b"--XX\r\nContent-Disposition: form-data; name=\"msg\"\r\n".to_vec();
        b.extend_from_slice(part_type.as_bytes());
        b.extend_from_slice(b"\r\n");
        b.extend_from_slice(text);
        b.extend_from_slice(b"\r\n--XX--\r\n");
        b
    };
    let utf16: Vec<u8> =
        r#"{"msg": "utf-16 été"}"#.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let json_ct = Some("application/json");
    let cases: Vec<(&str, Option<&str>, Vec<u8>, &str)> = vec![
        ("&msg=query+caf%E9", None, vec![], "query café"),
        ("", form, b"msg=form+caf%E9".to_vec(), "form café"),
        (
            "",
            form,
            b"msg=raw form caf\xe9 \x80".to_vec(),
            "raw form café €",
        ),
        (
            "",
            Some("application/x-www-form-urlencoded; charset=iso-8859-5"),
            b"msg=%BF%E0%D8%D2%D5%E2".to_vec(),
            "Привет",
        ),
        ("", form, "msg=utf-8 été".as_bytes().to_vec(), "utf-8 été"),
        (
            "",
            json_ct,
            "{\"msg\": \"utf-8 🚀 漢字\"}".as_bytes().to_vec(),
            "utf-8 🚀 漢字",
        ),
        (
            "",
            json_ct,
            b"{\"msg\": \"json caf\xe9\"}".to_vec(),
            "json café",
        ),
        (
            "",
            json_ct,
            b"\xef\xbb\xbf{\"msg\": \"bom\"}".to_vec(),
            "bom",
        ),
        (
            "",
            Some("application/json; charset=utf-16"),
            utf16,
            "utf-16 été",
        ),
        (
            "",
            Some("multipart/form-data; boundary=XX"),
            multipart("", b"multipart caf\xe9"),
            "multipart café",
        ),
        (
            "",
            Some("multipart/form-data; boundary=XX"),
            multipart(
                "Content-Type: text/plain; charset=koi8-r\r\n",
                b"\xf0\xd2\xc9\xd7\xc5\xd4",
            ),
            "Привет",
        ),
    ];
    let mut want = Vec::new();
    for (query, content_type, body, msg) in cases {
        let got = push(query, content_type, body).await;
        assert_eq!(got, (202, String::new()), "{msg}");
        want.push(msg.to_string());
    }
    let (status, text) = push(
        "",
        Some("application/json; charset=klingon"),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("\"klingon\" is not one this server knows"),
        "{text}"
    );
    let shift_jis = Some("application/x-www-form-urlencoded; charset=shift_jis");
    let (status, text) = push("", shift_jis, b"msg=%82%A0%82".to_vec()).await;
    assert_eq!(
        (status, text.as_str()),
        (
            400,
            "field \"msg\" is not Shift_JIS text, the charset declared for it"
        )
    );

    let mut got: Vec<String> = r
        .wait_sends(want.len())
        .await
        .iter()
        .filter_map(|s| s["msg"].as_str().map(String::from))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn long_texts_are_stored_and_delivered_on_every_database() {
    let r = rig("").await;
    r.endpoint(json!({"name": "all"}), &[json!({})]).await;
    // Over MySQL's 64 KiB TEXT: each became LONGTEXT there (migration 6).
    let msg = "m".repeat(300_000);
    let subject = "s".repeat(70_000);
    let location = "l".repeat(70_000);
    assert_status!(
        r.push(json!({"msg": msg, "subject": subject, "location": location}))
            .await,
        202
    );
    let sends = r.wait_sends(1).await;
    assert_eq!(sends[0]["msg"].as_str().map(str::len), Some(300_000));
    assert_eq!(sends[0]["subject"].as_str().map(str::len), Some(70_000));
    assert_eq!(sends[0]["location"].as_str().map(str::len), Some(70_000));
}

#[tokio::test]
async fn text_the_database_cannot_store_is_refused_naming_the_field() {
    let r = rig("").await;
    // U+0000: PostgreSQL stores it in neither text nor JSON.
    let p = r.push(json!({"msg": "a\u{0}b"})).await;
    assert_eq!(
        (p.status.as_u16(), p.text.as_str()),
        (
            400,
            "field \"msg\" holds a NUL character (U+0000), which cannot be stored"
        )
    );
    let e =
        r.s.manage(
            Method::POST,
            &format!("/addr/{}/endpoint", r.addr_id),
            Some(json!({"plugin_name": "t", "config": {"x": ["\u{0}"]}})),
        )
        .await;
    assert_status!(e, 400);
    assert!(
        e.text.starts_with("field \"config\" holds a NUL"),
        "{}",
        e.text
    );
    // Nothing was stored or sent; the next push goes through.
    r.endpoint(json!({"name": "all"}), &[json!({})]).await;
    assert_status!(r.push(json!({"msg": "fine"})).await, 202);
    assert_eq!(r.wait_sends(1).await[0]["msg"], "fine");
}

/// The pipeline's writer keeps its database connection only while it has
/// something to write. Once a push is delivered and the writer is idle, a
/// management change (a write transaction, which on SQLite waits for the
/// one write connection) goes through, instead of failing when the
/// server's 2 s timeout runs out waiting for that connection.
#[tokio::test]
async fn management_changes_go_through_once_pushes_are_delivered() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({})).await;
    for round in 0..5 {
        assert_status!(
            s.push(json!({"addr": a, "msg": format!("m{round}")})).await,
            202
        );
        let e = s.wait_settled(id).await;
        assert_eq!(e["deliveries"][0]["state"], "delivered", "{e}");
        let r = s
            .manage(
                Method::PATCH,
                &format!("/addr/{id}"),
                Some(json!({"active": 1})),
            )
            .await;
        assert_status!(r, 200);
    }
}

/// While deliveries back up behind a slow target and the dispatch queue
/// is full, the writer waits for room. Meanwhile:
/// - it gives back the connection its commits keep, so a management
///   change (a write transaction, which on SQLite waits for the one write
///   connection) goes through instead of failing at the 2 s timeout;
/// - a push it cannot take in time is answered 503 and never stored, so
///   its sender's retry cannot deliver it twice;
/// - every event answered 202 is delivered once the target is back.
#[tokio::test]
async fn a_full_dispatch_queue_holds_pushes_back_but_not_management() {
    let r = rig("  concurrency: 4\n").await;
    let gate = r.rec.with_file_name("gate");
    // 64 endpoints whose deliveries wait for the gate: each call holds a
    // place of the four in flight until the gate opens or the call times
    // out, so the queue drains by four every two seconds meanwhile.
    for _ in 0..64 {
        let waits = json!({"gate": gate.display().to_string()});
        r.s.endpoint(r.addr_id, "t", waits).await;
    }
    // With four deliveries in flight at the gate and four more taken by
    // the dispatcher, 129 events overflow the dispatch queue's 8,192
    // (`DISPATCH_QUEUE`): after the last 202 the writer waits for room,
    // and the next push is not taken in time.
    for i in 0..129 {
        let pushed = r.s.push(json!({"addr": r.a, "msg": format!("m{i}")})).await;
        assert_status!(pushed, 202);
    }
    let refused = r.s.push(json!({"addr": r.a, "msg": "refused"})).await;
    assert_status!(refused, 503);
    let changed =
        r.s.manage(
            Method::PATCH,
            &format!("/addr/{}", r.addr_id),
            Some(json!({"active": 1})),
        )
        .await;
    assert_status!(changed, 200);
    std::fs::write(&gate, b"").unwrap();
    let list = || async {
        r.s.manage(
            Method::GET,
            &format!("/addr/{}/event?limit=1000", r.addr_id),
            None,
        )
        .await
        .json()
    };
    let end = Instant::now() + Duration::from_secs(90);
    let accepted = list().await;
    for e in accepted.as_array().unwrap() {
        let id = e["id"].as_str().unwrap();
        let e = r.s.wait_event_settled(r.addr_id, id, end).await;
        let deliveries = e["deliveries"].as_array().unwrap();
        assert_eq!(deliveries.len(), 64, "{e}");
        assert!(deliveries.iter().all(|d| d["state"] == "delivered"), "{e}");
    }
    // Every delivery is handed over, so the writer has moved on to what
    // waited behind them: the refused push, had it been kept.
    r.s.wait_settled(r.addr_id).await;
    let events = list().await;
    let msgs: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["msg"].as_str())
        .collect();
    assert_eq!(msgs.len(), 129, "{msgs:?}");
    assert!(!msgs.contains(&"refused"), "the refused push was stored");
}
