//! The web console at `/ui/`: a real Chromium walks through it as an
//! operator would (`tests/console/console.mjs`, with playwright-core), and
//! plain HTTP checks what a browser cannot show: the session cookie's
//! flags, CSRF refusals, redirects to sign-in, slowed-down sign-ins,
//! `master.allow`, and what it says of a deletion that goes on.

use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use roboger_tests::{
    HttpSink, KEY, Method, Server, ServerOptions, assert_status, installed_program,
};

/// Where `tests/run` installed playwright-core (`ROBOGER_TEST_PLAYWRIGHT`),
/// or `None` (skipped, saying so) unless the whole suite is required.
fn playwright() -> Option<PathBuf> {
    let dir = std::env::var_os("ROBOGER_TEST_PLAYWRIGHT").map(PathBuf::from);
    if let Some(d) = dir.filter(|d| d.join("node_modules/playwright-core").is_dir()) {
        return Some(d);
    }
    assert!(
        std::env::var_os("ROBOGER_TEST_REQUIRE_ALL").is_none(),
        "ROBOGER_TEST_PLAYWRIGHT does not hold playwright-core; tests/run installs it"
    );
    eprintln!("SKIPPED: no playwright-core (ROBOGER_TEST_PLAYWRIGHT); tests/run installs it");
    None
}

/// Runs `script` (of `tests/console/`) with node, driving Chromium on
/// `server` with the master key, and `vars` besides; fails the test when
/// it fails. False when there is no browser (skipped, saying so).
async fn in_chromium(script: &str, server: &Server, vars: &[(&str, &str)]) -> bool {
    let Some(chromium) = installed_program("ROBOGER_TEST_CHROMIUM", "/usr/bin/chromium") else {
        return false;
    };
    let Some(pw) = playwright() else { return false };
    let run = {
        let mut cmd = Command::new("node");
        cmd.arg(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("console")
                .join(script),
        )
        .env("ROBOGER_URL", &server.base)
        .env("ROBOGER_KEY", KEY)
        .env("PLAYWRIGHT_DIR", &pw)
        .env("CHROMIUM", &chromium)
        .envs(vars.iter().copied());
        tokio::task::spawn_blocking(move || cmd.output())
    };
    let out = run.await.expect("join").expect("run node");
    let log = server.log_text();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}\nserver log:\n{log}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

#[tokio::test]
async fn an_operator_walks_through_the_console_in_a_browser() {
    // The first event is delivered; the second fails once (one attempt
    // only) and is delivered when retried from the console.
    let sink = HttpSink::start(vec![200, 500]).await;
    let server = Server::start_with(ServerOptions::builtin(
        "webhook",
        "delivery:\n  max-attempts: 1\n",
    ))
    .await;
    let shots = roboger_tests::bin_dir().join("../console-screenshots");
    let vars = [
        ("SINK_URL", sink.base.as_str()),
        ("SCREENSHOTS", &shots.to_string_lossy()),
    ];
    if !in_chromium("console.mjs", &server, &vars).await {
        return;
    }
    for name in [
        "signin",
        "addresses",
        "address",
        "endpoint-error",
        "events",
        "plugins",
    ] {
        assert!(
            shots.join(format!("{name}.png")).is_file(),
            "screenshot {name}"
        );
    }

    // What the webhook's target got: the first event with its file, the
    // second twice (failed, then retried).
    let got = sink.wait(3).await;
    let bodies: Vec<serde_json::Value> = got
        .iter()
        .map(|r| serde_json::from_slice(&r.body).expect("JSON from the template"))
        .collect();
    assert_eq!(bodies[0]["subject"], "first test");
    assert_eq!(
        bodies[0]["media"],
        base64::engine::general_purpose::STANDARD.encode("hello from the console")
    );
    assert_eq!(bodies[1]["subject"], "second test");
    assert_eq!(bodies[2]["subject"], "second test");
    assert!(got.iter().all(|r| r.path == "/hook" && r.method == "POST"));
}

/// A client that keeps no cookies and follows no redirects.
struct Browser<'a> {
    server: &'a Server,
    cookie: Option<String>,
}

impl Browser<'_> {
    async fn get(&self, path: &str) -> reqwest::Response {
        let mut r = self.server.http.get(self.server.url(path));
        if let Some(c) = &self.cookie {
            r = r.header("Cookie", c);
        }
        r.send().await.expect("GET")
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let mut r = self
            .server
            .http
            .post(self.server.url(path))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(encode(form));
        if let Some(c) = &self.cookie {
            r = r.header("Cookie", c);
        }
        r.send().await.expect("POST")
    }

    /// A browser on `server`, signed in.
    async fn signed_in(server: &Server) -> Browser<'_> {
        let mut b = Browser {
            server,
            cookie: None,
        };
        b.sign_in().await;
        b
    }

    /// Signs in; returns the `Set-Cookie` header.
    async fn sign_in(&mut self) -> String {
        let r = self
            .post("/ui/signin", &[("key", KEY), ("next", "/ui/addr")])
            .await;
        assert_eq!(r.status(), 303);
        assert_eq!(header(&r, "location"), "/ui/addr");
        let set = header(&r, "set-cookie");
        self.cookie = Some(set.split(';').next().unwrap_or("").to_string());
        set
    }

    /// Sends `action` to `path` with the CSRF token of `form_page`, as
    /// its button does, and follows the redirect: where it led, and that
    /// page.
    async fn act(&self, form_page: &str, path: &str, action: &str) -> (String, String) {
        let csrf = self.csrf(form_page).await;
        let r = self
            .post(path, &[("csrf", &csrf), ("action", action)])
            .await;
        assert_eq!(r.status(), 303, "{action} on {path}");
        let to = header(&r, "location");
        let page = self.get(&to).await.text().await.unwrap_or_default();
        (to, page)
    }

    /// The CSRF token in a page's forms.
    async fn csrf(&self, path: &str) -> String {
        let page = self.get(path).await.text().await.expect("page");
        let at = page
            .find("name=\"csrf\" value=\"")
            .expect("a form with a token")
            + 19;
        page[at..].split('"').next().unwrap_or("").to_string()
    }
}

/// A form, URL-encoded as a browser sends it.
fn encode(form: &[(&str, &str)]) -> String {
    form.iter()
        .map(|(k, v)| format!("{}={}", pct(k), pct(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn sessions_cookies_and_csrf() {
    let server = Server::start().await;
    let mut b = Browser {
        server: &server,
        cookie: None,
    };

    // Without a session, pages lead to sign-in (and back), and a form is refused.
    let r = b.get("/ui/addr?q=x").await;
    assert_eq!(r.status(), 303);
    assert_eq!(
        header(&r, "location"),
        "/ui/signin?next=%2Fui%2Faddr%3Fq%3Dx"
    );
    let r = b.post("/ui/addr", &[]).await;
    assert_eq!(r.status(), 303);
    assert!(header(&r, "location").starts_with("/ui/signin"));
    let r = b.get("/ui/signin").await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-security-policy").contains("script-src 'self'"));
    let page = r.text().await.unwrap_or_default();
    assert!(page.contains("<label for=\"key\">Master key</label>"));

    // A wrong key: no cookie.
    let r = b.post("/ui/signin", &[("key", "wrong")]).await;
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());

    // The cookie: HttpOnly, SameSite=Strict, for /ui, expiring; not Secure on http.
    let set = b.sign_in().await;
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=43200"] {
        assert!(set.contains(flag), "{flag} in {set}");
    }
    assert!(!set.contains("Secure"), "{set}");
    assert!(!set.contains(KEY), "the key is not in the cookie");
    // A signed-in visit to sign-in goes on.
    assert_eq!(b.get("/ui/signin?next=/ui/plugins").await.status(), 303);

    // A state-changing form without (or with a wrong) CSRF token is refused
    // and changes nothing.
    for form in [vec![], vec![("csrf", "forged")]] {
        let r = b.post("/ui/addr", &form).await;
        assert_eq!(r.status(), 403);
        assert!(r.text().await.unwrap_or_default().contains("CSRF"));
    }
    let list = server.manage(Method::GET, "/addr", None).await;
    assert_eq!(list.json().as_array().map(Vec::len), Some(0), "{list:?}");
    // With it, the address is made.
    let token = b.csrf("/ui/addr").await;
    let r = b.post("/ui/addr", &[("csrf", &token)]).await;
    assert_eq!(r.status(), 303);
    assert!(header(&r, "location").starts_with("/ui/addr/1"));
    let list = server.manage(Method::GET, "/addr", None).await;
    assert_eq!(list.json().as_array().map(Vec::len), Some(1));

    // Deleting asks first; the confirmed form deletes.
    let r = b
        .post("/ui/addr/1", &[("csrf", &token), ("action", "delete")])
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap_or_default()
            .contains("Delete address 1?")
    );
    assert_status!(server.manage(Method::GET, "/addr/1", None).await, 200);
    let r = b
        .post(
            "/ui/addr/1",
            &[("csrf", &token), ("action", "delete"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(r.status(), 303);
    assert_eq!(header(&r, "location"), "/ui/addr?done=deleted");
    assert_status!(server.manage(Method::GET, "/addr/1", None).await, 404);
    // Both changes are in the log of changes, as made in the console.
    server
        .wait_log(
            "path=/manage/v2/addr/1 status=204",
            std::time::Duration::from_secs(10),
        )
        .await;
    let changes = server.log_lines("management change");
    assert_eq!(changes.len(), 2, "{changes:#?}");
    for (line, what) in changes.iter().zip([
        "method=POST path=/manage/v2/addr status=201",
        "method=DELETE path=/manage/v2/addr/1 status=204",
    ]) {
        assert!(
            line.contains(&format!("client=127.0.0.1 via=console {what}")),
            "{line}"
        );
    }

    // A missing object is a 404 page, not an error.
    let r = b.get("/ui/addr/99").await;
    assert_eq!(r.status(), 404);
    assert!(
        r.text()
            .await
            .unwrap_or_default()
            .contains("addr 99 not found")
    );
    // Another method is 405 with Allow.
    let r = server
        .http
        .delete(server.url("/ui/addr"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), 405);
    assert_eq!(header(&r, "allow"), "GET, HEAD, POST");

    // Signing out ends the session on the server: the old cookie is useless.
    let old = b.cookie.clone();
    let r = b.post("/ui/signout", &[("csrf", &token)]).await;
    assert_eq!(r.status(), 303);
    assert!(header(&r, "set-cookie").contains("Max-Age=0"));
    b.cookie = old;
    assert_eq!(b.get("/ui/addr").await.status(), 303);
}

/// A public file cannot act as the console. A plugin keeps what was
/// pushed to it (media, a page) and the server serves it at `/file/{id}`,
/// in the console's origin: an HTML page's script there ran when a
/// signed-in operator opened its link, and read the console's pages with
/// their CSRF tokens, so it could do what the operator can. It is sent
/// sandboxed in an origin of its own now: Chromium runs none of its
/// script, and code in its page cannot read the console.
#[tokio::test]
async fn a_public_file_cannot_act_as_the_console() {
    let server = Server::start_with(ServerOptions::test_plugin("")).await;
    let (id, _) = server.new_addr().await;
    let page = "<html><head><title>a pushed page</title>\
                <script>document.title = 'its script ran'</script></head>\
                <body>pushed</body></html>";
    let r = server
        .manage(
            Method::POST,
            &format!("/addr/{id}/endpoint"),
            Some(
                serde_json::json!({"plugin_name": "t", "config": {"bucket": {
                    "content": page, "mimetype": "text/html", "public": true, "addr_id": id
                }}}),
            ),
        )
        .await;
    assert_status!(r, 201);
    let file = server.db_client().query("SELECT id FROM bucket");
    let path = format!("/file/{}", file.trim());
    let page = [
        ("PAGE_PATH", path.as_str()),
        ("PAGE_TITLE", "a pushed page"),
    ];
    in_chromium("foreign_page.mjs", &server, &page).await;
    let r = server.request(Method::GET, &path, None, &[], None).await;
    assert_status!(r, 200);
    assert_eq!(r.header("content-type"), Some("text/html"));
    assert_eq!(r.header("content-security-policy"), Some("sandbox"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}

/// A plugin's page cannot act as the console. Plugins answer their own
/// routes (`/plugin/{name}/…`) in the console's origin: a page one served
/// (or one of its pages echoing a link's query, as a seed-style route
/// returning a string does) could read the console's pages as a
/// signed-in operator opening it. It answers in an origin of its own now:
/// its script still runs, but cannot read the console.
#[tokio::test]
async fn a_plugins_page_cannot_act_as_the_console() {
    let server = Server::start_with(ServerOptions::test_plugin("")).await;
    let page = [
        ("PAGE_PATH", "/plugin/t/page"),
        ("PAGE_TITLE", "its script ran"),
    ];
    in_chromium("foreign_page.mjs", &server, &page).await;
    let r = server
        .request(Method::GET, "/plugin/t/page", None, &[], None)
        .await;
    assert_status!(r, 200);
    assert_eq!(
        r.header("content-security-policy"),
        Some("sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads")
    );
}

/// A new master key ends the console sessions signed in with the old
/// one. Sessions live in the database, so after an operator changed a
/// leaked key and restarted every node, a console signed in with the
/// leaked key went on working for the rest of its 12 hours, on every
/// node. A session is bound to the key it was signed in with now: a node
/// with another key does not know it.
#[tokio::test]
async fn a_new_master_key_ends_the_sessions_of_the_old_one() {
    let (_dir, db) = roboger_tests::shared_database();
    let old = Server::start_with(ServerOptions {
        db: Some(db.clone()),
        ..Default::default()
    })
    .await;
    let b = Browser::signed_in(&old).await;
    assert_eq!(b.get("/ui/addr").await.status(), 200);
    let new = Server::start_with(ServerOptions {
        db: Some(db),
        env: vec![("ROBOGER_MASTERKEY".into(), "a-new-master-key".into())],
        ..Default::default()
    })
    .await;
    let on_new = Browser {
        server: &new,
        cookie: b.cookie.clone(),
    };
    let r = on_new.get("/ui/addr").await;
    assert_eq!(
        r.status(),
        303,
        "the old key's session is gone on the new key's node"
    );
    assert_eq!(header(&r, "location"), "/ui/signin?next=%2Fui%2Faddr");
    let r = on_new.post("/ui/addr", &[]).await;
    assert_eq!(r.status(), 303);
    assert!(header(&r, "location").starts_with("/ui/signin"));
    // The node that still has the old key still knows it.
    assert_eq!(b.get("/ui/addr").await.status(), 200);
    // A sign-in with the new key works on the new key's node only.
    let r = on_new
        .post(
            "/ui/signin",
            &[("key", "a-new-master-key"), ("next", "/ui/addr")],
        )
        .await;
    assert_eq!(r.status(), 303);
    let cookie = header(&r, "set-cookie")
        .split(';')
        .next()
        .unwrap_or("")
        .to_string();
    let signed_new = Browser {
        server: &new,
        cookie: Some(cookie.clone()),
    };
    assert_eq!(signed_new.get("/ui/addr").await.status(), 200);
    let signed_new_on_old = Browser {
        server: &old,
        cookie: Some(cookie),
    };
    assert_eq!(signed_new_on_old.get("/ui/addr").await.status(), 303);
}

#[tokio::test]
async fn the_cookie_is_secure_behind_https() {
    let server = Server::start_with(ServerOptions {
        yaml: "url: https://roboger.example.com\n".into(),
        ..Default::default()
    })
    .await;
    let mut b = Browser {
        server: &server,
        cookie: None,
    };
    assert!(b.sign_in().await.contains("; Secure"));
}

#[tokio::test]
async fn repeated_failed_sign_ins_are_slowed_down() {
    let server = Server::start().await;
    let b = Browser {
        server: &server,
        cookie: None,
    };
    for _ in 0..3 {
        assert_eq!(
            b.post("/ui/signin", &[("key", "wrong")]).await.status(),
            403
        );
    }
    // The next attempt must wait, even with the right key.
    let r = b.post("/ui/signin", &[("key", KEY)]).await;
    assert_eq!(r.status(), 429);
    assert!(
        header(&r, "retry-after")
            .parse::<u64>()
            .is_ok_and(|s| s >= 1)
    );
    assert!(
        r.text()
            .await
            .unwrap_or_default()
            .contains("Too many wrong keys from your address")
    );
    // After the wait (a second), the right key signs in; waiting attempts
    // do not count as failures (if they did, each one would double the
    // wait, and the loop would never get in). A 503 is the page that says
    // the database did not answer in time, "try again": a loaded CI
    // machine stalled SQLite's writes for seconds once, so it is tried
    // again like a 429.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = b.post("/ui/signin", &[("key", KEY)]).await;
        if r.status() == 303 {
            break;
        }
        assert!(
            [429, 503].contains(&r.status().as_u16()),
            "a sign-in after the wait: {}",
            r.status()
        );
        assert!(
            std::time::Instant::now() < end,
            "still refused after the wait"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sign_ins_sent_at_once_are_counted_one_by_one() {
    // A guesser that sends many attempts at once from one address gets
    // no more tries than one sending them in turn: the three free
    // failures, then the wait. Each attempt is counted before its key is
    // checked, so none can slip in between another's check and its count.
    let server = Server::start().await;
    let b = Browser {
        server: &server,
        cookie: None,
    };
    let attempts = (0..24).map(|i| {
        let key = format!("wrong-{i}");
        let b = &b;
        async move { b.post("/ui/signin", &[("key", &key)]).await.status() }
    });
    let statuses = futures_util::future::join_all(attempts).await;
    let refused = statuses.iter().filter(|s| s.as_u16() == 403).count();
    let waiting = statuses.iter().filter(|s| s.as_u16() == 429).count();
    assert_eq!(
        refused, 3,
        "keys checked out of 24 sent at once: {statuses:?}"
    );
    assert_eq!(refused + waiting, 24, "{statuses:?}");
    // The right key must wait too, then gets in.
    let r = b.post("/ui/signin", &[("key", KEY)]).await;
    assert_eq!(r.status(), 429);
}

#[tokio::test]
async fn master_allow_applies_to_the_console() {
    let server = Server::start_with(ServerOptions {
        master_yaml: "allow: [10.0.0.0/8]\n".into(),
        ..Default::default()
    })
    .await;
    let r = server
        .http
        .get(server.url("/ui/signin"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 403);
    let r = server
        .http
        .post(server.url("/ui/signin"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(encode(&[("key", KEY)]))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());
}

/// Deleting an address whose history outlasts `timeout` is answered at
/// once, and the console says the deletion goes on rather than that it
/// is done; the address is gone when it ends.
#[tokio::test]
async fn deleting_an_address_with_a_long_history_says_it_goes_on() {
    let server = Server::start_with(ServerOptions::test_plugin("timeout: 1\n")).await;
    // 300,000 events take a deletion, 500 at a time, well past 1 s.
    let (id, _, _) = server.addr_with_history(&server.db_client(), 300_000).await;

    let b = Browser::signed_in(&server).await;
    let page = format!("/ui/addr/{id}");
    let token = b.csrf(&page).await;
    let r = b
        .post(
            &page,
            &[("csrf", &token), ("action", "delete"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(r.status(), 303);
    let to = header(&r, "location");
    assert_eq!(to, "/ui/addr?done=deleting");
    let text = b.get(&to).await.text().await.unwrap_or_default();
    assert!(
        text.contains("Being deleted: its history is long and goes a chunk at a time"),
        "{text}"
    );

    let end = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while server
        .manage(Method::GET, &format!("/addr/{id}"), None)
        .await
        .status
        != 404
    {
        assert!(
            std::time::Instant::now() < end,
            "the address was never deleted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_open_event_history_does_not_hold_up_a_stop() {
    let mut server = Server::start().await;
    server.new_addr().await;
    let stream = {
        let b = Browser::signed_in(&server).await;
        b.get("/ui/addr/1/events/stream").await
    };
    assert_eq!(stream.status(), 200);
    assert_eq!(header(&stream, "content-type"), "text/event-stream");
    // The stream stays open; a stop ends it instead of waiting out the
    // shutdown grace period (10 s) for it.
    let began = std::time::Instant::now();
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        began.elapsed() < std::time::Duration::from_secs(8),
        "the stop waited {:?} for the open stream",
        began.elapsed()
    );
    let rest = stream.text().await.unwrap_or_default();
    assert!(rest.contains("event:end"), "{rest:?}");
}

/// An event another Roboger forwarded says by how many in its history;
/// one pushed here directly says nothing of it.
#[tokio::test]
async fn a_forwarded_event_says_so_in_the_history() {
    let server = Server::start().await;
    let (id, a) = server.new_addr().await;
    for (msg, hops) in [("forwarded", Some("3")), ("direct", None)] {
        let headers: Vec<(&str, &str)> = hops.map(|h| ("X-Roboger-Hops", h)).into_iter().collect();
        let r = server
            .request(
                Method::POST,
                "/push",
                None,
                &headers,
                Some(serde_json::json!({"addr": a, "msg": msg})),
            )
            .await;
        assert_status!(r, 202);
    }
    let b = Browser::signed_in(&server).await;
    let r = b.get(&format!("/ui/addr/{id}/events")).await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap_or_default();
    let (direct, forwarded) = page
        .split_once("<pre class=\"msg\">forwarded</pre>")
        .expect("the forwarded event is on the page");
    assert!(direct.contains("<pre class=\"msg\">direct</pre>"), "{page}");
    assert!(!direct.contains("<dt>Forwarded</dt>"), "{direct}");
    assert!(
        forwarded.contains("<dt>Forwarded</dt><dd>by 3 other Roboger servers</dd>"),
        "{forwarded}"
    );
}

/// A delivery that failed and will be tried again says when in the
/// history: here a target that asked for a minute with `Retry-After`.
#[tokio::test]
async fn a_delivery_waiting_to_be_tried_again_says_when() {
    let sink = HttpSink::retry_after(vec![429], "60").await;
    let server = Server::start_with(ServerOptions::builtin("webhook", "")).await;
    let (id, a) = server.new_addr().await;
    let ep = server
        .endpoint(id, "webhook", serde_json::json!({"url": sink.base}))
        .await;
    assert_status!(
        server
            .push(serde_json::json!({"addr": a, "msg": "later"}))
            .await,
        202
    );
    let (wait, _) = server.first_retry_waits(id, &[ep]).await.remove(0);
    assert!(wait > 55.0, "{wait}");
    let e = server
        .manage(Method::GET, &format!("/addr/{id}/event?limit=1"), None)
        .await
        .json();
    let ev = e[0]["id"].as_str().unwrap_or_default().to_string();
    let next_at = server
        .manage(Method::GET, &format!("/addr/{id}/event/{ev}"), None)
        .await
        .json()["deliveries"][0]["next_at"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let next = chrono::DateTime::parse_from_rfc3339(&next_at)
        .unwrap()
        .to_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let b = Browser::signed_in(&server).await;
    let page = b
        .get(&format!("/ui/addr/{id}/events"))
        .await
        .text()
        .await
        .unwrap_or_default();
    assert!(
        page.contains(&format!(
            "<td class=\"state\">pending<br><span class=\"hint\">next try <time datetime=\"{next}\">"
        )),
        "{page}"
    );
}

/// The console's test event to an address that is disabled, or over its
/// limit, is refused with a page saying which (409), and nothing is sent.
#[tokio::test]
async fn a_test_event_the_address_refuses_says_why() {
    let server = Server::start_with(ServerOptions {
        yaml: "limits:\n  period: day\n".into(),
        ..Default::default()
    })
    .await;
    let (id, _) = server.new_addr().await;
    let b = Browser::signed_in(&server).await;
    let send = |csrf: String| {
        let b = &b;
        async move {
            let r = b
                .post(
                    &format!("/ui/addr/{id}/push"),
                    &[("csrf", &csrf), ("level", "info"), ("msg", "test")],
                )
                .await;
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
    };
    for (change, said) in [
        (
            serde_json::json!({"active": 0}),
            "the address is disabled: enable it to send events to it",
        ),
        (
            serde_json::json!({"active": 1, "lim_c": 0}),
            "the address is over its limits for now",
        ),
    ] {
        let r = server
            .manage(Method::PATCH, &format!("/addr/{id}"), Some(change))
            .await;
        assert_status!(r, 200);
        let csrf = b.csrf(&format!("/ui/addr/{id}/events")).await;
        let (status, page) = send(csrf).await;
        assert_eq!(status, 409, "{page}");
        assert!(page.contains(said), "{page}");
    }
    let events = server
        .manage(Method::GET, &format!("/addr/{id}/event"), None)
        .await
        .json();
    assert_eq!(events, serde_json::json!([]));
}

/// An endpoint's page says how its deliveries stand, with its newest
/// error, and retries its failed ones with one button once its target is
/// back; the button is gone when nothing has failed.
#[tokio::test]
async fn an_endpoints_page_retries_its_failed_deliveries() {
    let server =
        Server::start_with(ServerOptions::test_plugin("delivery:\n  max-attempts: 1\n")).await;
    let (id, a) = server.new_addr().await;
    // Fails each event's first attempt, which max-attempts makes its last.
    let ep = server
        .endpoint(id, "t", serde_json::json!({"fail_times": 1}))
        .await;
    for msg in ["one", "two"] {
        assert_status!(
            server
                .push(serde_json::json!({"addr": a, "msg": msg}))
                .await,
            202
        );
    }
    server.endpoint_settles(id, ep, 0, 2).await;
    let b = Browser::signed_in(&server).await;
    let path = format!("/ui/addr/{id}/endpoint/{ep}");
    let page = b.get(&path).await.text().await.unwrap_or_default();
    assert!(
        page.contains("Of the events kept: 0 delivered, 0 pending, 2 failed.")
            && page.contains("planned failure 1 of 1")
            && page.contains("Retry the 2 failed deliveries"),
        "{page}"
    );
    let csrf = b.csrf(&path).await;
    let r = b.post(&path, &[("csrf", &csrf), ("action", "retry")]).await;
    assert_eq!(r.status(), 303);
    assert_eq!(
        header(&r, "location"),
        format!("{path}?done=retried#deliveries")
    );
    server.endpoint_settles(id, ep, 2, 0).await;
    let page = b
        .get(&format!("{path}?done=retried"))
        .await
        .text()
        .await
        .unwrap_or_default();
    assert!(
        page.contains("Failed deliveries queued again.")
            && page.contains("Of the events kept: 2 delivered, 0 pending, 0 failed.")
            && !page.contains("Retry the"),
        "{page}"
    );
}

/// An address with many endpoints shows them a page at a time; a change
/// to one on a later page leads back to the page that shows it, and
/// disabling an endpoint or the address says what that does to their
/// pending deliveries.
#[tokio::test]
async fn an_address_with_many_endpoints_is_shown_a_page_at_a_time() {
    let server = Server::start_with(ServerOptions::test_plugin("")).await;
    let (id, _) = server.new_addr().await;
    // 105 endpoints: six pages, and more than the copy form lists by name.
    let mut eps = Vec::new();
    for _ in 0..105 {
        eps.push(server.endpoint(id, "t", serde_json::json!({})).await);
    }
    // Each endpoint's subscription names it, so a subscription shown
    // under the wrong endpoint is seen.
    for ep in &eps {
        let sub = server.subscriptions(id, *ep).await[0]["id"]
            .as_i64()
            .expect("a subscription");
        let r = server
            .manage(
                Method::PATCH,
                &format!("/addr/{id}/endpoint/{ep}/subscription/{sub}"),
                Some(serde_json::json!({"tag": format!("tag-of-{ep}")})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let b = Browser::signed_in(&server).await;
    let shown = |page: &str| -> Vec<i64> {
        page.split("<article class=\"card\" id=\"endpoint-")
            .skip(1)
            .map(|block| {
                let ep: i64 = block
                    .split('"')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("an endpoint's number");
                let article = block.split("</article>").next().unwrap_or("");
                assert!(
                    article.contains(&format!("value=\"tag-of-{ep}\""))
                        && article.matches("value=\"tag-of-").count() == 1,
                    "endpoint {ep}'s block holds another's subscription: {article}"
                );
                ep
            })
            .collect()
    };
    // Page after page, following "Next endpoints", every endpoint once.
    let mut path = format!("/ui/addr/{id}");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = b.get(&path).await.text().await.unwrap_or_default();
        assert!(page.contains("Endpoints <small>(105)</small>"), "{page}");
        let on_page = shown(&page);
        assert!(
            on_page.len() <= 20,
            "{} endpoints on one page",
            on_page.len()
        );
        seen.extend(on_page);
        pages += 1;
        let Some(at) = page.find("\" rel=\"next\"") else {
            break;
        };
        let href = page[..at].rsplit("href=\"").next().unwrap_or("");
        path = href.replace("&amp;", "&");
    }
    assert_eq!(seen, eps);
    assert_eq!(pages, 6);
    // A change to an endpoint on a later page leads back to the page that
    // shows it.
    let ep = eps[87];
    let here = format!("/ui/addr/{id}");
    let (to, page) = b
        .act(&here, &format!("{here}/endpoint/{ep}"), "disable")
        .await;
    assert!(to.ends_with(&format!("#endpoint-{ep}")), "{to}");
    assert!(
        shown(&page).contains(&ep)
            && page.contains(
                "Disabled. It gets no new event, and its pending deliveries are not sent"
            )
            && page.contains("First endpoints"),
        "{page}"
    );
    // Past 100 others, the copy form asks for the endpoint's number, and
    // copying by it works.
    let page = b
        .get(&format!("/ui/addr/{id}/endpoint/{}", eps[0]))
        .await
        .text()
        .await
        .unwrap_or_default();
    assert!(
        page.contains("id=\"target\" name=\"target\" type=\"number\"")
            && !page.contains("<option value=\""),
        "{page}"
    );
    let csrf = b.csrf(&here).await;
    let r = b
        .post(
            &format!("/ui/addr/{id}/endpoint/{}", eps[0]),
            &[
                ("csrf", &csrf),
                ("action", "copysub"),
                ("target", &eps[104].to_string()),
            ],
        )
        .await;
    assert_eq!(r.status(), 303);
    let subs = server
        .manage(
            Method::GET,
            &format!("/addr/{id}/endpoint/{}/subscription", eps[104]),
            None,
        )
        .await
        .json();
    assert_eq!(subs.as_array().map(Vec::len), Some(2), "{subs}");
    // Disabling the address says what that does to its endpoints.
    let (_, page) = b.act(&here, &here, "disable").await;
    assert!(
        page.contains("Disabled. It takes no push, and the pending deliveries of its endpoints"),
        "{page}"
    );
}

/// An endpoint with many subscriptions (one per site, say) shows them a
/// page at a time on its address's page, each once, with the count; a
/// change to one on a later page leads back to the page that shows it.
/// Before, every subscription of every endpoint on the page was read and
/// shown at once.
#[tokio::test]
async fn an_endpoint_with_many_subscriptions_is_shown_a_page_at_a_time() {
    let server = Server::start_with(ServerOptions::test_plugin("")).await;
    let (id, _) = server.new_addr().await;
    let ep = server.endpoint(id, "t", serde_json::json!({})).await;
    let other = server.endpoint(id, "t", serde_json::json!({})).await;
    for i in 1..45 {
        let r = server
            .manage(
                Method::POST,
                &format!("/addr/{id}/endpoint/{ep}/subscription"),
                Some(serde_json::json!({"location": format!("site-{i}")})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let subs: Vec<i64> = server
        .subscriptions(id, ep)
        .await
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["id"].as_i64()).collect())
        .unwrap_or_default();
    assert_eq!(subs.len(), 45);
    let b = Browser::signed_in(&server).await;
    // The subscriptions an endpoint's block shows.
    let shown = |page: &str, of: i64| -> Vec<i64> {
        let block = page
            .split(&format!("<article class=\"card\" id=\"endpoint-{of}\""))
            .nth(1)
            .and_then(|b| b.split("</article>").next())
            .unwrap_or_default();
        block
            .split("aria-label=\"Subscription ")
            .skip(1)
            .filter_map(|s| s.split('"').next()?.parse().ok())
            .collect()
    };
    let mut path = format!("/ui/addr/{id}");
    let mut seen = Vec::new();
    for range in ["1 to 20 of 45", "21 to 40 of 45", "41 to 45 of 45"] {
        let page = b.get(&path).await.text().await.unwrap_or_default();
        assert!(page.contains(&format!("Subscriptions {range}")), "{page}");
        assert!(page.contains("Subscriptions <small>(45)</small>"), "{page}");
        assert_eq!(shown(&page, other).len(), 1, "the other endpoint's own");
        seen.extend(shown(&page, ep));
        let next = format!("\">Next subscriptions of endpoint {ep}</a>");
        match page.find(&next) {
            Some(at) => {
                let href = page[..at].rsplit("href=\"").next().unwrap_or("");
                path = href.replace("&amp;", "&");
            }
            None => assert_eq!(range, "41 to 45 of 45", "no next page: {page}"),
        }
    }
    assert_eq!(seen, subs);
    // A change to a subscription on the last page leads back to it.
    let sub = subs[42];
    let (to, page) = b
        .act(
            &format!("/ui/addr/{id}"),
            &format!("/ui/addr/{id}/endpoint/{ep}/subscription/{sub}"),
            "disable",
        )
        .await;
    assert!(shown(&page, ep).contains(&sub), "{to}: {page}");
    assert!(page.contains("Subscriptions 41 to 45 of 45"), "{page}");
    assert!(page.contains(&format!("First subscriptions of endpoint {ep}")));
}

/// An endpoint whose plugin this server does not run (a database taken
/// over from the original, a plugin taken out of the config) or that is
/// kept from running says so on its address's page, and why its
/// deliveries wait (and the start warns of the first); one whose plugin
/// runs says nothing.
#[tokio::test]
async fn an_endpoint_whose_plugin_is_not_here_says_so() {
    let (_dir, db) = roboger_tests::shared_database();
    // The same database under three configs: the webhook plugin, none,
    // and one named webhook that refuses its plugin config.
    let refusing = format!(
        "- name: webhook\n  command: {}\n  env:\n    TEST_PLUGIN_MODE: refuse-config\n",
        roboger_tests::test_plugin_bin().display()
    );
    let configs = [
        ServerOptions::builtin("webhook", ""),
        ServerOptions::default(),
        ServerOptions {
            plugins_yaml: refusing,
            ..Default::default()
        },
    ];
    let mut pages = Vec::new();
    for (i, opts) in configs.into_iter().enumerate() {
        let mut server = Server::start_with(ServerOptions {
            db: Some(db.clone()),
            ..opts
        })
        .await;
        let id = if i == 0 {
            let (id, _) = server.new_addr().await;
            let url = serde_json::json!({"url": "http://127.0.0.1:9/x"});
            server.endpoint(id, "webhook", url).await;
            id
        } else {
            1
        };
        if i == 1 {
            server
                .wait_log(
                    "endpoints use plugins this server does not configure: webhook (1 endpoint)",
                    std::time::Duration::from_secs(10),
                )
                .await;
        }
        let b = Browser::signed_in(&server).await;
        let r = b.get(&format!("/ui/addr/{id}")).await;
        assert_eq!(r.status(), 200);
        pages.push(r.text().await.unwrap_or_default());
        server.terminate();
    }
    assert!(!pages[0].contains("Plugin webhook is"), "{}", pages[0]);
    for (page, said) in [
        (
            &pages[1],
            "Plugin webhook is not in this server&#39;s configuration: its deliveries wait, \
             not tried, until a server that runs it takes them",
        ),
        (
            &pages[2],
            "Plugin webhook is refused: its deliveries wait, not tried, until it runs again",
        ),
    ] {
        assert!(page.contains(said), "{said}\n{page}");
    }
}
