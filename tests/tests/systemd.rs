//! The systemd notify protocol, heard the way systemd hears it: the test
//! binds the `NOTIFY_SOCKET` datagram socket and sets `WATCHDOG_USEC`.
//! `READY=1` comes only when the server answers; `WATCHDOG=1` comes
//! regularly, stops while the writer cannot commit (the SQLite database
//! held locked by another process) and comes back after; SIGTERM gives
//! `STOPPING=1`.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roboger_tests::{Method, Server, ServerOptions, SqliteLock, assert_status, json, poll_until};

/// Every datagram received, with when it came.
#[derive(Clone, Default)]
struct Heard(Arc<Mutex<Vec<(Instant, String)>>>);

impl Heard {
    fn listen(path: &std::path::Path) -> Heard {
        let sock = UnixDatagram::bind(path).expect("bind NOTIFY_SOCKET");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let heard = Heard::default();
        let h = heard.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let Ok(mut v) = h.0.lock() else { return };
                    v.push((Instant::now(), msg));
                }
                if Arc::strong_count(&h.0) == 1 {
                    return;
                }
            }
        });
        heard
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Messages with `line` (e.g. `WATCHDOG=1`) heard in `[from, to)`.
    fn count(&self, line: &str, from: Instant, to: Instant) -> usize {
        self.all()
            .iter()
            .filter(|(at, m)| *at >= from && *at < to && m.lines().any(|l| l == line))
            .count()
    }

    /// Waits (at most `limit`) for a message with `line`; when it came.
    async fn wait(&self, line: &str, after: Instant, limit: Duration) -> Instant {
        poll_until(limit, async || {
            let all = self.all();
            match all
                .iter()
                .find(|(at, m)| *at >= after && m.lines().any(|l| l == line))
            {
                Some((at, _)) => Ok(*at),
                None => Err(format!("never heard {line}; heard {all:?}")),
            }
        })
        .await
    }
}

#[tokio::test]
async fn ready_when_answering_watchdog_only_while_progressing_stopping_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("notify");
    let heard = Heard::listen(&sock);
    let db = dir.path().join("roboger.db");
    let began = Instant::now();
    let starting = Server::spawn(ServerOptions {
        db: Some(format!("sqlite:///{}", db.display())),
        plugins: vec!["t".into()],
        env: vec![
            ("NOTIFY_SOCKET".into(), sock.display().to_string()),
            ("WATCHDOG_USEC".into(), "1000000".into()),
        ],
        ..Default::default()
    });
    let ready = heard.wait("READY=1", began, Duration::from_secs(30)).await;
    let mut s = starting.wait();
    // Ready means answering, with the plugins up.
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
    let plugins = s.manage(Method::GET, "/plugin", None).await.json();
    assert_eq!(plugins[0]["state"], "running", "{plugins}");
    assert_eq!(
        heard.count("WATCHDOG=1", began, ready),
        0,
        "no ping before READY"
    );

    // Pings every half interval (0.5 s), with a status.
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({})).await;
    assert_status!(s.push(json!({"addr": a, "msg": "before"})).await, 202);
    let from = Instant::now();
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let pings = heard.count("WATCHDOG=1", from, Instant::now());
    assert!(pings >= 4, "{pings} pings in 2.6 s: {:?}", heard.all());
    assert!(
        heard
            .all()
            .iter()
            .any(|(_, m)| m.contains("STATUS=1 of 1 plugins running")),
        "{:?}",
        heard.all()
    );

    // The database locked by another process: commits cannot succeed
    // while pushes keep coming, and the pings stop.
    let lock = SqliteLock::take(&db);
    let frozen = Instant::now();
    let pusher = {
        let base = s.base.clone();
        let a = a.clone();
        tokio::spawn(async move {
            let http = roboger_tests::client();
            let mut tasks = Vec::new();
            while frozen.elapsed() < Duration::from_secs(4) {
                let req = http
                    .post(format!("{base}/push"))
                    .json(&json!({"addr": a, "msg": "while frozen"}))
                    .send();
                tasks.push(tokio::spawn(req));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let stalled = heard.count(
        "WATCHDOG=1",
        frozen + Duration::from_millis(1500),
        Instant::now(),
    );
    assert_eq!(
        stalled,
        0,
        "pings while the writer cannot commit: {:?}",
        heard.all()
    );
    assert!(
        heard
            .all()
            .iter()
            .any(|(at, m)| *at > frozen && m.contains("STATUS=stalled: the writer")),
        "{:?}",
        heard.all()
    );
    drop(lock);
    let _ = pusher.await;
    let thawed = Instant::now();
    heard
        .wait("WATCHDOG=1", thawed, Duration::from_secs(10))
        .await;
    assert_status!(s.push(json!({"addr": a, "msg": "after"})).await, 202);

    let term = Instant::now();
    assert!(s.terminate().success());
    heard.wait("STOPPING=1", term, Duration::from_secs(5)).await;
}

/// A server listening on a Unix socket makes the watchdog's request
/// there: the pings come, and none is withheld.
#[tokio::test]
async fn the_watchdog_reaches_a_server_on_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("notify");
    let heard = Heard::listen(&sock);
    let began = Instant::now();
    let starting = Server::spawn(ServerOptions {
        listen_yaml: Some(format!(
            "listen: unix:{}",
            dir.path().join("roboger.sock").display()
        )),
        env: vec![
            ("NOTIFY_SOCKET".into(), sock.display().to_string()),
            ("WATCHDOG_USEC".into(), "1000000".into()),
        ],
        ..Default::default()
    });
    let ready = heard.wait("READY=1", began, Duration::from_secs(30)).await;
    let s = starting.wait();
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
    // Pings every half interval (0.5 s) once ready.
    poll_until(Duration::from_secs(10), async || {
        match heard.count("WATCHDOG=1", ready, Instant::now()) {
            4.. => Ok(()),
            _ => Err(format!(
                "too few pings: {:?}\n{}",
                heard.all(),
                s.log_text()
            )),
        }
    })
    .await;
    assert!(
        s.log_lines("watchdog ping withheld").is_empty(),
        "{}",
        s.log_text()
    );
}
