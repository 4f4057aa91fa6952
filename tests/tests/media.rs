//! Bounded memory with media: a backlog of events with media behind a
//! target that hangs keeps the server's and the plugin's memory bounded
//! (queued deliveries hold no media; calls in flight are bounded in bytes
//! per plugin), and every event arrives intact once the target answers.
//! A burst of large pushes beyond the body budget is answered 202 or 503
//! with `Retry-After`, never with a broken connection, and every 202 is
//! delivered. Bodies that stall hold no more room than they sent, and are
//! cut off. A body over the limit is answered 413 even to a client that
//! sends all of it before it reads, and one that then goes quiet is let go.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use roboger_tests::{
    HttpSink, Method, Server, ServerOptions, Value, assert_status, json, plugin_bin, poll_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Media unique to event `i`.
fn media(i: usize, len: usize) -> Vec<u8> {
    let mut m: Vec<u8> = (0..len).map(|j| ((j * 31 + i * 7) % 251) as u8).collect();
    m[..8].copy_from_slice(&(i as u64).to_le_bytes());
    m
}

fn b64(m: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(m)
}

/// An address of `s` whose webhook endpoint sends each event's message and
/// media to `sink`; returns the address.
async fn wire(s: &Server, sink: &HttpSink) -> String {
    let (id, a) = s.new_addr().await;
    let template = r#"{"msg": $msg, "media": $media}"#;
    s.endpoint(
        id,
        "webhook",
        json!({"url": format!("{}/hook", sink.base), "template": template}),
    )
    .await;
    a
}

async fn webhook_server(yaml: &str) -> Server {
    Server::start_with(ServerOptions {
        yaml: yaml.into(),
        plugins_yaml: format!(
            "- name: webhook\n  command: {}\n",
            plugin_bin("webhook").display()
        ),
        ..Default::default()
    })
    .await
}

/// What the sink got: message → media bytes, from the webhook's bodies.
/// Each body is decoded once: `seen` counts those already in `got`.
fn received_into(sink: &HttpSink, got: &mut BTreeMap<String, Vec<u8>>, seen: &mut usize) {
    let all = sink.requests();
    for r in &all[(*seen).min(all.len())..] {
        let Ok(v) = serde_json::from_slice::<Value>(&r.body) else {
            continue;
        };
        let (Some(msg), Ok(media)) = (
            v["msg"].as_str(),
            base64::engine::general_purpose::STANDARD
                .decode(v["media"].as_str().unwrap_or_default()),
        ) else {
            continue;
        };
        got.insert(msg.to_string(), media);
    }
    *seen = all.len();
}

/// Waits until what the sink took (message to media) satisfies `done`
/// (or panics after `within`), and gives it. Each look decodes only the
/// requests that came since the last one.
async fn wait_received(
    sink: &HttpSink,
    within: Duration,
    done: impl Fn(&BTreeMap<String, Vec<u8>>) -> bool,
) -> BTreeMap<String, Vec<u8>> {
    let (mut got, mut seen) = (BTreeMap::new(), 0);
    poll_until(within, async || {
        received_into(sink, &mut got, &mut seen);
        match done(&got) {
            true => Ok(std::mem::take(&mut got)),
            false => Err(format!("delivered {:?}", got.keys().collect::<Vec<_>>())),
        }
    })
    .await
}

fn received(sink: &HttpSink) -> BTreeMap<String, Vec<u8>> {
    let mut got = BTreeMap::new();
    received_into(sink, &mut got, &mut 0);
    got
}

#[tokio::test]
async fn a_media_backlog_behind_a_hanging_target_stays_small_and_all_arrives() {
    const EVENTS: usize = 200;
    let sink = HttpSink::start(vec![]).await;
    sink.hold();
    let s = webhook_server("delivery:\n  retry-base: 0.05\n  retry-max: 1\n  max-attempts: 1000\n")
        .await;
    let a = wire(&s, &sink).await;
    let plugins = s.manage(Method::GET, "/plugin", None).await.json();
    let plugin_pid = plugins[0]["pid"].as_u64().expect("webhook runs") as u32;

    let (mut server_peak, mut plugin_peak) = (0f64, 0f64);
    for i in 0..EVENTS {
        let r = s
            .push(json!({"addr": a, "msg": format!("m{i}"), "media": b64(&media(i, MIB))}))
            .await;
        assert_status!(r, 202);
        if i % 25 == 0 {
            server_peak = server_peak.max(rss_mib(s.pid()));
            plugin_peak = plugin_peak.max(rss_mib(plugin_pid));
        }
    }
    // Deliveries keep being tried against the hanging target for a while.
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        server_peak = server_peak.max(rss_mib(s.pid()));
        plugin_peak = plugin_peak.max(rss_mib(plugin_pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(received(&sink).is_empty(), "the target was holding");
    // Twice the release-build targets (150 and 96 MiB): 200 MiB of media
    // are waiting, which before held most of it in both processes.
    assert!(
        server_peak <= 300.0,
        "server RSS {server_peak:.0} MiB with {EVENTS} MiB of media waiting"
    );
    assert!(
        plugin_peak <= 192.0,
        "plugin RSS {plugin_peak:.0} MiB with {EVENTS} MiB of media waiting"
    );

    sink.release();
    let got = wait_received(&sink, Duration::from_secs(120), |got| got.len() == EVENTS).await;
    for (msg, m) in &got {
        let i: usize = msg[1..].parse().expect("m<i>");
        assert!(*m == media(i, MIB), "media of {msg} differs");
    }
}

/// A push sent by hand: its body's first `start` bytes now, the rest when
/// `finish` is called; then its answer.
struct SlowPush {
    stream: tokio::net::TcpStream,
    rest: Vec<u8>,
}

impl SlowPush {
    async fn begin(base: &str, body: &[u8], start: usize) -> SlowPush {
        let addr = base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /push HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("write head");
        stream.write_all(&body[..start]).await.expect("write start");
        SlowPush {
            stream,
            rest: body[start..].to_vec(),
        }
    }

    async fn finish(mut self) -> String {
        self.stream.write_all(&self.rest).await.expect("write rest");
        let mut answer = vec![0u8; 512];
        let n = self.stream.read(&mut answer).await.expect("read answer");
        String::from_utf8_lossy(&answer[..n]).into_owned()
    }

    /// Everything the server sends until it ends its side of the
    /// connection, without sending the rest of the body.
    async fn answer_unfinished(&mut self) -> String {
        let mut answer = Vec::new();
        self.stream
            .read_to_end(&mut answer)
            .await
            .expect("read answer");
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Sends the rest of the body a MiB at a time; false once the
    /// server's socket refuses it.
    async fn send_rest(&mut self) -> bool {
        for chunk in self.rest.chunks(MIB) {
            if self.stream.write_all(chunk).await.is_err() {
                return false;
            }
        }
        true
    }
}

#[tokio::test]
async fn bodies_that_stall_neither_hold_the_budget_nor_their_connection() {
    let sink = HttpSink::start(vec![]).await;
    // Room for one 8 MiB push (10.7 MiB as JSON) at a time; a body gets
    // 2 × timeout (4 s) before it must arrive at 8 KiB/s.
    let s = webhook_server("body-budget: 16777216\ntimeout: 2\n").await;
    let a = wire(&s, &sink).await;
    let large =
        serde_json::to_vec(&json!({"addr": a, "msg": "large", "media": b64(&media(1, 8 * MIB))}))
            .expect("JSON");

    // Four clients announce pushes as large and send one byte of each.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(SlowPush::begin(&s.base, &large, 1).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = Instant::now();

    // They hold almost no room: a push as large is taken at once, and
    // so is a small one.
    let http = roboger_tests::client();
    let r = http
        .post(s.url("/push"))
        .header("Content-Type", "application/json")
        .body(large.clone())
        .send()
        .await
        .expect("the large push is answered");
    assert_eq!(r.status().as_u16(), 202, "{:?}", r.text().await);
    assert_status!(s.push(json!({"addr": a, "msg": "small"})).await, 202);

    // Each stalled body is answered 408 once its grace is over, and its
    // connection is closed.
    for mut push in stalled {
        let answer = push.answer_unfinished().await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("did not arrive in time"), "{answer}");
    }
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(30),
        "the stalled bodies were cut off after {waited:?}"
    );

    wait_received(&sink, Duration::from_secs(60), |got| {
        got.contains_key("large") && got.contains_key("small")
    })
    .await;
}

#[tokio::test]
async fn a_push_over_the_limit_is_answered_413_even_to_a_client_that_sends_it_whole() {
    // Python's http.client and hyper's client send a whole body before
    // they read; the server answers 413 from the Content-Length alone,
    // so it must read and drop what follows before it closes, or the
    // kernel's reset destroys the answer.
    let s = webhook_server("").await;
    let body = vec![b' '; 40 * MIB];
    for _ in 0..2 {
        let answer = SlowPush::begin(&s.base, &body, 0).await.finish().await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
    }

    // A client that stops sending after the answer is let go once it has
    // been quiet for 5 s: what it sends later meets a closed socket.
    let mut push = SlowPush::begin(&s.base, &body, MIB).await;
    let answer = push.answer_unfinished().await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        !push.send_rest().await,
        "the server still read the body 8 s after it went quiet"
    );
}

/// A stop lets a socket closing after a 413 linger as it would: a client
/// that sends its whole body before it reads gets the answer. A stop
/// drops a connection still receiving a request head a second on, and
/// the first cut of that also dropped one lingering after its answer,
/// whose unread bytes made the close a reset that destroyed the 413.
#[tokio::test]
async fn a_stop_lets_a_413_reach_a_client_that_sends_its_body_whole() {
    let s = webhook_server("").await;
    let body = vec![b' '; 40 * MIB];
    let push = SlowPush::begin(&s.base, &body, 0).await;
    // A request after it is answered: the 413's has been read.
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
    s.signal("TERM");
    // The client is slow to send its body: past the stop's second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let answer = push.finish().await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test]
async fn large_pushes_beyond_the_body_budget_get_202_or_503_with_retry_after() {
    let sink = HttpSink::start(vec![]).await;
    // Room for one 8 MiB push (10.7 MiB as JSON) at a time.
    let s = webhook_server("body-budget: 16777216\ntimeout: 2\n").await;
    let a = wire(&s, &sink).await;
    let body = |msg: &str, i: usize| {
        serde_json::to_vec(&json!({"addr": a, "msg": msg, "media": b64(&media(i, 8 * MIB))}))
            .expect("JSON")
    };

    // A push whose body is still arriving holds room for what it has sent
    // (all but its last KiB here); another large one finds none for the
    // rest of its own, is read to its end, and gets 503 with Retry-After
    // on a connection that stays usable.
    let slow_body = body("slow", 0);
    let slow = SlowPush::begin(&s.base, &slow_body, slow_body.len() - 1024).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let http = roboger_tests::client();
    let r = http
        .post(s.url("/push"))
        .header("Content-Type", "application/json")
        .body(body("refused", 1))
        .send()
        .await
        .expect("the refused push is answered, not reset");
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
    let answer = slow.finish().await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    // A burst: each is accepted or told to come back; none is reset.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (http, url, b) = (http.clone(), s.url("/push"), body(&format!("b{i}"), i + 2));
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .header("Content-Type", "application/json")
                .body(b)
                .send()
                .await
                .expect("answered, not reset");
            let retry = r.headers().get("retry-after").is_some();
            (format!("b{i}"), r.status().as_u16(), retry)
        }));
    }
    let mut accepted = vec!["slow".to_string()];
    for t in tasks {
        let (msg, status, retry) = t.await.expect("push task");
        match status {
            202 => accepted.push(msg),
            503 => assert!(retry, "503 without Retry-After"),
            other => panic!("push {msg} answered {other}"),
        }
    }
    assert!(accepted.len() > 1, "no push of the burst was accepted");
    let got = wait_received(&sink, Duration::from_secs(60), |got| {
        accepted.iter().all(|m| got.contains_key(m))
    })
    .await;
    assert!(!got.contains_key("refused"), "accepted {accepted:?}");
}
