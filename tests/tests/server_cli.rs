//! The server binary as an operator meets it: the embedded default, the
//! original's config files, strict config errors, the subcommands, logs
//! and shutdown.

use std::process::Command;
use std::time::Duration;

use roboger_tests::{
    KEY, Method, Server, ServerOptions, assert_status, client, json, poll_every, run_server_cmd,
    server_bin, sha256_hex, spawn_and_wait_listening,
};

/// Whether `tool` (one of systemd's, which tests/run installs) runs; a
/// test without it is skipped, unless every test must run.
fn installed(tool: &str) -> bool {
    let available = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var_os("ROBOGER_TEST_REQUIRE_ALL").is_none(),
            "{tool} is missing; tests/run installs it"
        );
        eprintln!("SKIPPED: {tool} is not installed");
    }
    available
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A configuration in `dir` for a server without plugins on the SQLite
/// file `dir/roboger.db`: the file's path and the configuration's.
fn on_sqlite_file(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let db = dir.join("roboger.db");
    let config = write(
        dir,
        "roboger.yml",
        &format!(
            "roboger:\n  db: sqlite:///{}\n  listen: 127.0.0.1:0\n  master: {{key: {KEY}}}\n  plugins: []\n",
            db.display()
        ),
    );
    (db, config)
}

async fn core_status(base: &str, key: &str) -> u16 {
    client()
        .get(format!("{base}/manage/v2/core"))
        .header("X-Auth-Key", key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn embedded_default_generates_prints_and_reuses_the_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let start = || {
        let mut cmd = Command::new(server_bin());
        cmd.args(["--listen", "127.0.0.1:0"])
            .env("ROBOGER_DATA_DIR", &data)
            .env_remove("ROBOGER_CONFIG")
            .env_remove("ROBOGER_DB")
            .env_remove("ROBOGER_MASTERKEY");
        spawn_and_wait_listening(cmd)
    };
    let (mut child, addr, log) = start();
    let key = std::fs::read_to_string(data.join("master.key"))
        .unwrap()
        .trim()
        .to_string();
    assert!(key.len() >= 32, "weak key {key:?}");
    {
        let log = log.text();
        assert!(log.contains(&key), "the key is printed once: {log}");
        assert!(
            log.contains(&data.join("master.key").display().to_string()),
            "with its path: {log}"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("master.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        data.join("roboger.db").is_file(),
        "SQLite database in the data dir"
    );
    let base = format!("http://{addr}");
    assert_eq!(core_status(&base, &key).await, 200);
    let r = client()
        .post(format!("{base}/manage/v2/addr"))
        .header("X-Auth-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // The built-in plugins next to the binary are configured and running.
    let plugins: serde_json::Value = client()
        .get(format!("{base}/manage/v2/plugin"))
        .header("X-Auth-Key", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = plugins
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["plugin_name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["chain", "email", "shell", "slack", "telegram", "webhook"],
        "every built-in plugin, sorted: {plugins}"
    );
    for p in plugins.as_array().unwrap() {
        assert_eq!(p["state"], "running", "{p}");
        assert!(
            p["version"].is_string() && p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{p}"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // The next start reuses the key and the data, and does not print it.
    let (mut child, addr, log) = start();
    let base = format!("http://{addr}");
    assert!(!log.text().contains(&key));
    assert_eq!(core_status(&base, &key).await, 200);
    let list: serde_json::Value = client()
        .get(format!("{base}/manage/v2/addr"))
        .header("X-Auth-Key", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn an_original_config_file_starts_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let keyfile = write(dir.path(), "key", "from-a-file\n");
    let cfg = format!(
        "roboger:
  db: sqlite:///{db}
  url: http://localhost:7719
  log-tracebacks: true
  secure-mode: false
  thread-pool-size: 20
  db-pool-size: 2
  timeout: 5
  api-doc: /
  bucket:
    default-expires: 86400
  master:
    key: {key}
    allow: ['127.0.0.1']
  plugins:
    - name: webhook
    - name: email
      config:
        smtp:
          host: localhost
  gunicorn:
    listen: 127.0.0.1:0
    start-failure-delay: 1
    extra-options: -w 1 --threads 8
",
        db = dir.path().join("r.db").display(),
        key = keyfile.display()
    );
    let path = write(dir.path(), "roboger.yml", &cfg);
    let mut cmd = Command::new(server_bin());
    cmd.env("ROBOGER_CONFIG", &path)
        .env_remove("ROBOGER_DB")
        .env_remove("ROBOGER_MASTERKEY");
    let (mut child, addr, log) = spawn_and_wait_listening(cmd);
    let base = format!("http://{addr}");
    assert_eq!(core_status(&base, "from-a-file").await, 200);
    let log_text = log.text();
    for ignored in [
        "thread-pool-size",
        "secure-mode",
        "gunicorn.start-failure-delay",
    ] {
        assert!(
            log_text.contains(ignored),
            "a log line names {ignored}: {log_text}"
        );
    }
    // The API documentation is served at api-doc.
    let r = client()
        .get(format!("{base}/openapi.yaml"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("/manage/v2/addr"));
    child.kill().unwrap();
    child.wait().unwrap();

    // ROBOGER_MASTERKEY and ROBOGER_DB override the file.
    let mut cmd = Command::new(server_bin());
    cmd.env("ROBOGER_CONFIG", &path)
        .env("ROBOGER_MASTERKEY", "from-env")
        .env(
            "ROBOGER_DB",
            format!("sqlite:///{}", dir.path().join("other.db").display()),
        );
    let (mut child, addr, _log) = spawn_and_wait_listening(cmd);
    let base = format!("http://{addr}");
    assert_eq!(core_status(&base, "from-env").await, 200);
    assert_eq!(core_status(&base, "from-a-file").await, 403);
    assert!(dir.path().join("other.db").is_file());
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A `roboger.yml` of the original whose gunicorn listens on a Unix
/// socket (for a proxy on the same host) serves there: the management
/// API, pushes and their deliveries. A client of the socket is local for
/// `master.allow`, and `ip-header` names the real one. A socket that a
/// running server listens on is not taken over, one left by a server
/// that died is, a clean stop removes it, and a file that is not a
/// socket is refused.
#[tokio::test]
async fn an_original_config_listening_on_a_unix_socket_serves_there() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("roboger.sock");
    let mut s = Server::start_with(ServerOptions {
        listen_yaml: Some(format!(
            "gunicorn:\n  listen: unix:{}\n  workers: 2",
            sock.display()
        )),
        master_yaml: "allow: ['127.0.0.1']".into(),
        yaml: "ip-header: X-Real-IP".into(),
        plugins: vec!["t".into()],
        ..Default::default()
    })
    .await;
    let said = format!("listening on unix:{}", sock.display());
    assert!(s.log_text().contains(&said), "{}", s.log_text());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666, "connectable as a loopback port is");

    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({})).await;
    assert_status!(
        s.push(json!({"addr": a, "msg": "over the socket"})).await,
        202
    );
    let (state, attempts, _) = s.settled_delivery(id).await;
    assert_eq!((state.as_str(), attempts), ("delivered", 1));
    let as_client = |ip: &'static str| {
        let s = &s;
        async move {
            s.request(
                Method::GET,
                "/manage/v2/addr",
                Some(KEY),
                &[("X-Real-IP", ip), ("Accept", "*/*")],
                None,
            )
            .await
        }
    };
    assert_status!(as_client("192.0.2.7").await, 403);
    assert_status!(as_client("127.0.0.1").await, 200);

    // A second server on the same socket stops; the first keeps serving.
    let config = s.config_path.display().to_string();
    let (code, _, err) = run_server_cmd(&["--config", &config], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("another process listens on this socket"),
        "{err}"
    );
    assert_status!(s.manage(Method::GET, "/addr", None).await, 200);

    // SIGKILL leaves the socket file; the next start replaces it.
    s.kill_and_restart();
    s.wait_log(
        "replacing a socket file nobody listened on",
        Duration::from_secs(5),
    )
    .await;
    let addrs = s.manage(Method::GET, "/addr", None).await.json();
    assert_eq!(addrs[0]["a"], a.as_str(), "{addrs}");

    // A clean stop removes it; anything else at the path is refused.
    assert!(s.terminate().success(), "{}", s.log_text());
    assert!(!sock.exists(), "the socket file stays after a stop");
    std::fs::write(&sock, "not a socket").unwrap();
    let (code, _, err) = run_server_cmd(&["--config", &config], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "not a socket");
}

/// `systemd-socket-activate` holding a listening socket at each of
/// `sockets` (`-l`, after `flags`) and starting the server with `config`
/// at the first connection, as a `.socket` unit would; the server's data
/// under `dir`. Like systemd, it gives the server an environment of its
/// own (`TERM`, `PATH`, `HOME` and what `-E` sets), not the test's.
fn socket_activated(
    flags: &[&str],
    sockets: &[&std::ffi::OsStr],
    config: &std::path::Path,
    dir: &std::path::Path,
) -> Command {
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(flags);
    for s in sockets {
        cmd.arg("-l").arg(s);
    }
    cmd.arg("-E")
        .arg(format!("XDG_DATA_HOME={}", dir.display()))
        .arg(server_bin())
        .arg("--config")
        .arg(config);
    cmd
}

/// Waits (at most 10 s) for the socket `systemd-socket-activate` makes.
async fn appears(sock: &std::path::Path) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(std::time::Instant::now() < end, "no socket at {sock:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM to the server `child`, which must exit 0.
fn stops_cleanly(mut child: std::process::Child, log: &roboger_tests::LiveLog) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    assert!(child.wait().unwrap().success(), "{}", log.text());
}

/// Under systemd socket activation (here `systemd-socket-activate`, which
/// holds the socket and starts the server at the first connection, as a
/// `.socket` unit can) the server serves the socket it is passed instead
/// of `listen`. The first request, made before the server ran, waited in
/// the socket's backlog and is answered. The plugins it starts inherit
/// neither the socket nor `LISTEN_FDS`. The socket, systemd's, stays
/// after the server stops, for its next start.
#[tokio::test]
async fn a_socket_passed_by_systemd_is_served_from_the_first_request() {
    if !installed("systemd-socket-activate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("roboger.sock");
    let rec = dir.path().join("rec.jsonl");
    let cfg = format!(
        "roboger:\n  db: sqlite:///{}\n  listen: 127.0.0.1:0\n  master:\n    key: {KEY}\n  \
         sandbox:\n    writable: [{}]\n  \
         plugins:\n    - name: t\n      command: {}\n      env:\n        TEST_PLUGIN_RECORD: {}\n",
        dir.path().join("r.db").display(),
        dir.path().display(),
        roboger_tests::test_plugin_bin().display(),
        rec.display()
    );
    let path = write(dir.path(), "roboger.yml", &cfg);
    let cmd = socket_activated(&[], &[sock.as_os_str()], &path, dir.path());
    let started = tokio::task::spawn_blocking(move || spawn_and_wait_listening(cmd));
    appears(&sock).await;
    let (base, http) = roboger_tests::reach(&format!("unix:{}", sock.display()));
    let first = http.get(format!("{base}/ping")).send().await.unwrap();
    assert_eq!(first.status().as_u16(), 204);
    let (child, addr, log) = started.await.unwrap();
    assert_eq!(addr, format!("unix:{}", sock.display()));
    let text = log.text();
    assert!(
        text.contains("serving the socket systemd passed; listen (127.0.0.1:0) is not used"),
        "{text}"
    );
    let r = http
        .post(format!("{base}/manage/v2/addr"))
        .header("X-Auth-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);

    // A plugin the server starts gets neither the socket nor the
    // variables that would make it think systemd passed it one.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let start = loop {
        if let Some(start) = roboger_tests::json_lines(&rec)
            .into_iter()
            .find(|r| r["method"] == "start")
        {
            break start;
        }
        assert!(
            std::time::Instant::now() < end,
            "plugin t never started: {}",
            log.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(start["env_listen_fds"].is_null(), "{start}");
    assert!(start["env_listen_pid"].is_null(), "{start}");
    assert_eq!(start["inherited_sockets"], json!([]), "{start}");

    stops_cleanly(child, &log);
    assert!(sock.exists(), "systemd's socket was removed");
}

/// A `.socket` unit may pass several sockets, say a TCP port for remote
/// clients and a Unix socket for a local proxy: the server serves every
/// one of them, and the watchdog's probe reaches each.
#[tokio::test]
async fn every_socket_systemd_passes_is_served() {
    if !installed("systemd-socket-activate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    // systemd-socket-activate takes no port 0. A loopback address of this
    // process's own (all of 127/8 is the loopback) is one no other test
    // binds, so its port cannot be taken meanwhile.
    let pid = std::process::id();
    let tcp = format!("127.{}.{}.2:7719", (pid >> 8) & 0xff, pid & 0xff);
    let cfg = format!(
        "roboger:\n  db: sqlite:///{}\n  master:\n    key: {KEY}\n",
        dir.path().join("r.db").display()
    );
    let path = write(dir.path(), "roboger.yml", &cfg);
    // systemd's end of the notify protocol, with a watchdog of 1 s.
    let notify = dir.path().join("notify");
    let heard = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    heard
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let notify_socket = format!("NOTIFY_SOCKET={}", notify.display());
    let flags = ["-E", &notify_socket, "-E", "WATCHDOG_USEC=1000000"];
    let cmd = socket_activated(&flags, &[sock.as_os_str(), tcp.as_ref()], &path, dir.path());
    let started = tokio::task::spawn_blocking(move || spawn_and_wait_listening(cmd));
    appears(&sock).await;
    let (unix_base, unix) = roboger_tests::reach(&format!("unix:{}", sock.display()));
    let (tcp_base, http) = roboger_tests::reach(&tcp);
    // The first request starts the server, which answers it.
    let first = unix.get(format!("{unix_base}/ping")).send().await.unwrap();
    assert_eq!(first.status().as_u16(), 204);
    let (child, _, log) = started.await.unwrap();
    let text = log.text();
    assert!(
        text.contains("serving the 2 sockets systemd passed; listen (127.0.0.1:7719) is not used"),
        "{text}"
    );
    assert!(
        text.contains(&format!("listening on unix:{}, {tcp}", sock.display())),
        "{text}"
    );

    // An address made over TCP takes a push over the Unix socket.
    let r = http
        .post(format!("{tcp_base}/manage/v2/addr"))
        .header("X-Auth-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let a = r.json::<serde_json::Value>().await.unwrap()["a"]
        .as_str()
        .unwrap()
        .to_string();
    let r = unix
        .post(format!("{unix_base}/push"))
        .json(&json!({"addr": a, "msg": "over the other socket"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);

    // The watchdog's probe reaches both sockets: the pings come (every
    // 0.5 s), and none is withheld.
    let mut pings = 0;
    let mut buf = [0u8; 4096];
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while pings < 4 {
        assert!(
            std::time::Instant::now() < end,
            "{pings} pings: {}",
            log.text()
        );
        if let Ok(n) = heard.recv(&mut buf) {
            let said = String::from_utf8_lossy(&buf[..n]);
            pings += usize::from(said.lines().any(|l| l == "WATCHDOG=1"));
        }
    }
    let text = log.text();
    assert!(!text.contains("watchdog ping withheld"), "{text}");

    stops_cleanly(child, &log);
    assert!(sock.exists(), "systemd's socket was removed");
}

/// A passed socket the server cannot serve (here datagram sockets, as a
/// `.socket` unit's `ListenDatagram=` makes) stops the start with a
/// message naming which of the sockets it is, rather than serve the rest.
#[test]
fn a_passed_socket_that_cannot_be_served_stops_the_start() {
    if !installed("systemd-socket-activate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let cfg = format!(
        "roboger:\n  db: sqlite:///{}\n  master:\n    key: {KEY}\n",
        dir.path().join("r.db").display()
    );
    let path = write(dir.path(), "roboger.yml", &cfg);
    let sockets = [a.as_os_str(), b.as_os_str()];
    let mut child = socket_activated(&["--datagram"], &sockets, &path, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // systemd-socket-activate starts the server at the first datagram.
    let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while client.send_to(b"push", &a).is_err() {
        assert!(std::time::Instant::now() < end, "no socket at {a:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            panic!("the server runs although it cannot serve the sockets systemd passed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(
            "cannot serve socket 1 of the 2 systemd passed: not a listening stream socket"
        ),
        "{err}"
    );
}

#[test]
fn bad_configs_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("roboger:\n  master:\n    key: k\n  colour: red\n", "colour"),
        (
            "roboger:\n  master:\n    key: k\n  timeout: soon\n",
            "roboger.timeout",
        ),
        (
            "roboger:\n  master:\n    key: k\n  url: 'not a url'\n",
            "roboger.url",
        ),
        (
            "roboger:\n  master:\n    key: k\n  db: 'oracle://db'\n",
            "roboger.db",
        ),
        (
            "roboger:\n  master:\n    key: k\n    allow: ['300.1.1.1']\n",
            "roboger.master.allow[0]",
        ),
        (
            "roboger:\n  master:\n    key: k\n  limits:\n    period: fortnight\n",
            "roboger.limits.period",
        ),
        (
            "roboger:\n  master:\n    key: k\n  plugins:\n    - name: webhook\n      confg: {}\n",
            "confg",
        ),
        (
            "roboger:\n  master:\n    key: k\n  listen: 'nowhere:port'\n",
            "roboger.listen",
        ),
        // A shell's way of giving a program arguments.
        (
            "roboger:\n  master:\n    key: k\n  plugins:\n    - name: p\n      command: node /nowhere/p.js\n",
            "roboger.plugins[0].command: no file \"node /nowhere/p.js\"; to give the program arguments, write the command as a list: [node, /nowhere/p.js]",
        ),
        // nginx's way, which was taken as the host 0.0.0.8080.
        (
            "roboger:\n  master:\n    key: k\n  listen: 8080\n",
            "roboger.listen: 8080 names only a port: write 127.0.0.1:8080",
        ),
        ("robogerr:\n  db: x\n", "robogerr"),
    ];
    for (i, (yaml, key)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("bad{i}.yml"), yaml);
        let (code, _out, err) = run_server_cmd(
            &["--config", p.to_str().unwrap(), "check-config"],
            &[("ROBOGER_DATA_DIR", dir.path().to_str().unwrap())],
        );
        assert_eq!(code, 2, "{yaml}: {err}");
        assert!(
            err.contains(key),
            "error for {yaml:?} should name {key}: {err}"
        );
        // Said once, on one line, and in the file's words, not Rust's.
        assert_eq!(
            err.lines().filter(|l| l.contains(key)).count(),
            1,
            "{yaml}: {err}"
        );
        assert!(!err.contains("f64") && !err.contains("struct"), "{err}");
        // serve refuses it the same way, without starting.
        let (code, _, err) = run_server_cmd(
            &["--config", p.to_str().unwrap()],
            &[("ROBOGER_DATA_DIR", dir.path().to_str().unwrap())],
        );
        assert_eq!(code, 2, "{err}");
    }
    let (code, _, err) = run_server_cmd(
        &["--config", "/nonexistent/roboger.yml", "check-config"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/roboger.yml"), "{err}");
}

/// A SQLite database's path given as `db`, as an operator new to the
/// original's URLs writes it, is refused with what to write instead.
/// Before, a path starting with `/` (which names a file holding the URL)
/// said only "stream did not contain valid UTF-8" of an existing database
/// and "No such file or directory" of a new one, and a bare `r.db` only
/// "not a database URL".
#[test]
fn a_sqlite_path_given_as_db_is_refused_with_what_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let made = write(
        dir.path(),
        "made.yml",
        &format!(
            "roboger:\n  db: sqlite:///{}\n  master:\n    key: k\n",
            db.display()
        ),
    );
    let (code, _, err) = run_server_cmd(&["--config", made.to_str().unwrap(), "migrate"], &[]);
    assert_eq!(code, 0, "{err}");
    let new = dir.path().join("new.db");
    for (value, said) in [
        (
            db.display().to_string(),
            format!("it is a SQLite database, not a file holding a value; a value of db starting with / or ./ names a file holding the database URL: for a SQLite database at {0}, write sqlite:///{0}", db.display()),
        ),
        (
            new.display().to_string(),
            format!("write sqlite:///{}", new.display()),
        ),
        (
            "r.db".to_string(),
            "not a database URL: r.db; for a SQLite database at r.db (from the working directory), write sqlite:///r.db".to_string(),
        ),
    ] {
        let p = write(
            dir.path(),
            "r.yml",
            &format!("roboger:\n  db: {value}\n  master:\n    key: k\n"),
        );
        let (code, _, err) = run_server_cmd(&["--config", p.to_str().unwrap(), "check-config"], &[]);
        assert_eq!(code, 2, "{value}: {err}");
        let line: Vec<&str> = err.lines().filter(|l| l.contains("roboger.db")).collect();
        assert_eq!(line.len(), 1, "{value}: {err}");
        assert!(line[0].contains(&said), "{value}: {err}");
        // What it says to write is taken.
        let p = write(
            dir.path(),
            "r.yml",
            &format!("roboger:\n  db: sqlite:///{value}\n  master:\n    key: k\n"),
        );
        let (code, _, err) = run_server_cmd(&["--config", p.to_str().unwrap(), "check-config"], &[]);
        assert_eq!(code, 0, "{value}: {err}");
    }
}

/// A database URL's password is never printed, not even in the error
/// that refuses the URL, which goes to the terminal and the journal.
/// With JSON logs that error is one JSON line, so the stream stays JSON.
#[test]
fn a_refused_database_url_is_said_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "r.yml",
        "roboger:\n  db: postgresql://roboger:Sup3r-Secret@db.example:port/r\n  master:\n    key: k\n",
    );
    let config = p.to_str().unwrap();
    for args in [
        vec!["--config", config],
        vec!["--config", config, "check-config"],
        vec!["--config", config, "--log-format", "json"],
    ] {
        let (code, _, err) = run_server_cmd(&args, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.contains("Sup3r"), "{args:?}: {err}");
        let said: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("roboger.db: not a valid URL"))
            .collect();
        assert_eq!(said.len(), 1, "{args:?}: {err}");
        assert!(
            said[0].contains("postgresql://roboger:[secret]@db.example:port/r"),
            "{args:?}: {err}"
        );
        if args.contains(&"json") {
            for l in err.lines() {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
            }
        }
    }
}

#[test]
fn subcommands_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let p = write(
        dir.path(),
        "r.yml",
        &format!(
            "roboger:\n  db: sqlite:///{}\n  master:\n    key: k\n  plugins:\n    - name: webhook\n",
            db.display()
        ),
    );
    let (code, out, err) = run_server_cmd(&["--config", p.to_str().unwrap(), "check-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("configuration OK") && out.contains("webhook"),
        "{out}"
    );
    assert!(!db.exists(), "check-config touches no database");
    let (code, _, err) = run_server_cmd(&["--config", p.to_str().unwrap(), "migrate"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(db.is_file());
    assert!(err.contains("migrations applied"), "{err}");
    let (code, out, _) = run_server_cmd(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
    let (code, _, err) = run_server_cmd(&["frobnicate"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("frobnicate"));
}

/// A start on a database already migrated says nothing of what the
/// migrations found there. On PostgreSQL, sqlx logs the database's
/// notices at INFO, and the migrations' `IF NOT EXISTS` made three lines
/// at every start ("relation \"seaql_migrations\" already exists,
/// skipping").
#[tokio::test]
async fn a_start_on_a_migrated_database_logs_no_notices() {
    let (_dir, db) = roboger_tests::shared_database();
    let opts = || ServerOptions {
        db: Some(db.clone()),
        ..Default::default()
    };
    let mut first = Server::start_with(opts()).await;
    assert!(first.terminate().success());
    let second = Server::start_with(opts()).await;
    assert_status!(
        second.request(Method::GET, "/ping", None, &[], None).await,
        204
    );
    assert!(
        second.log_lines("already exists").is_empty(),
        "{}",
        second.log_text()
    );
}

/// Clients that connect while the server takes no connections (busy, or
/// a burst of robots pushing on the minute) wait in the kernel's backlog,
/// up to 4,096 of them, and are then served. Before, the backlog was the
/// standard library's 128: the kernel dropped the connections past it,
/// and their clients sent them again a second later, then three (a burst
/// of 2,000 connections saw 300 to 1,400 of them so delayed). Here the
/// server is stopped (SIGSTOP) while 300 clients connect.
#[tokio::test]
async fn connections_made_while_the_server_is_busy_wait_in_its_backlog() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start().await;
    let addr = s.base.trim_start_matches("http://").to_string();
    s.signal("STOP");
    let connects = (0..300).map(|_| {
        let addr = addr.clone();
        async move {
            tokio::time::timeout(
                Duration::from_millis(1500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
        }
    });
    let connected: Vec<_> = futures_util::future::join_all(connects)
        .await
        .into_iter()
        .filter_map(|c| c.ok().and_then(Result::ok))
        .collect();
    s.signal("CONT");
    assert_eq!(connected.len(), 300, "connections the kernel completed");
    let pings = connected.into_iter().map(|mut c| async move {
        c.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        c.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    });
    for answer in futures_util::future::join_all(pings).await {
        let answer = answer.expect("an answer");
        assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    }
}

/// A client that comes while idle connections hold every place the
/// server has (4,096) is served at once: the idle ones give way. Before,
/// it waited until one of them ended, 30 s later (the header read
/// timeout), and a client that kept opening connections and sending
/// nothing kept the server from everyone else. A request under way on a
/// connection meanwhile is not cut short. Here another process holds
/// 4,200 connections open and silent.
#[tokio::test]
async fn idle_connections_give_way_to_a_client_that_comes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start().await;
    let addr = s.base.trim_start_matches("http://").to_string();
    // A push whose body is still on its way, at a pace the server takes
    // (16 KiB/s of spaces), while the places fill up.
    let head = "{\"addr\": \"no such one\"";
    let padding = 1 << 20;
    let mut under_way = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    under_way
        .write_all(
            format!(
                "POST /push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{head}",
                head.len() + padding + 1
            )
            .as_bytes(),
        )
        .await
        .expect("send");
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let sending = tokio::spawn(async move {
        let mut sent = 0;
        let chunk = vec![b' '; 4096];
        while stopped.try_recv().is_err() && sent + chunk.len() < padding {
            under_way.write_all(&chunk).await.expect("send");
            sent += chunk.len();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        under_way
            .write_all(&vec![b' '; padding - sent])
            .await
            .expect("send");
        under_way.write_all(b"}").await.expect("send");
        let mut answer = vec![0; 12];
        under_way.read_exact(&mut answer).await.expect("an answer");
        String::from_utf8_lossy(&answer).into_owned()
    });
    let mut holder = hold_connections(&addr, 4200, "");
    // Before, each client that found no place asked 64 more to give way
    // while those asked before were still closing: 700 to 3,200 of the
    // 4,096 closed here.
    ping_past_held_connections(&s, Duration::from_secs(10), 4200 + 1).await;
    let _ = stop.send(());
    assert_eq!(sending.await.expect("the push's client"), "HTTP/1.1 404");
    drop(holder.stdin.take());
    let _ = holder.wait();
}

/// A client that comes while slow request heads hold every place is
/// served within seconds: each of 4,200 connections sent the start of a
/// request head, which a slow client (or one that means to hold the
/// server) may go on sending for the 30 s the server gives a head. The
/// longest idle of them give way as idle connections do, the second
/// they are given to end their head over. Before, asked to give way,
/// each went on waiting for the rest of its head, and the client waited
/// until the header read timeout ended them.
#[tokio::test]
async fn slow_request_heads_give_way_to_a_client_that_comes() {
    let s = Server::start().await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut holder = hold_connections(&addr, 4200, "GET /ping HTTP/1.1\r\nHost: x\r\n");
    // About 2 s here: the 104 before it give way 64 at a time, each
    // group a second after it was asked.
    ping_past_held_connections(&s, Duration::from_secs(15), 4200).await;
    drop(holder.stdin.take());
    let _ = holder.wait();
}

/// Pings `s`, which other connections hold full, within `within` (less
/// than the 30 s of the header read timeout, which would end them), and
/// checks what gave way: `came` clients and the few connections of this
/// test's own client (at its start, for the ping and the scrape; 8 at
/// most, counted here) against 4,096 places. Each client past them is
/// let in by one connection closing, with no more than 64 places free or
/// being freed at once: at least 64 given way, at most one for each
/// client past the places and 64 more, and at least 4,032 still open.
async fn ping_past_held_connections(s: &Server, within: Duration, came: usize) {
    let ping = tokio::time::timeout(within, s.request(Method::GET, "/ping", None, &[], None))
        .await
        .expect("the ping answered before the held connections' 30 s were over");
    assert_status!(ping, 204);
    let m = s.metrics().await;
    let given_way = m.get("roboger_connections_given_way_total").copied();
    let most = (came + 8 - 4096 + 64) as f64;
    assert!(
        given_way >= Some(64.0) && given_way <= Some(most),
        "{given_way:?} given way, at most {most}"
    );
    let open = m.get("roboger_connections_open").copied();
    assert!(
        open <= Some(4096.0) && open >= Some((4096 - 64) as f64),
        "{open:?} open"
    );
}

/// Another process (Python) holding `count` connections to `addr` open,
/// each having sent `first` and nothing more, until its stdin closes.
fn hold_connections(addr: &str, count: usize, first: &str) -> std::process::Child {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let python = std::env::var_os("ROBOGER_TEST_PYTHON").unwrap_or("python3".into());
    let mut holder = std::process::Command::new(python)
        .args([
            "-c",
            "import resource, socket, sys\n\
             soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
             resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 10000), hard))\n\
             held = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(int(sys.argv[3]))]\n\
             [c.sendall(sys.argv[4].encode()) for c in held]\n\
             print('held', flush=True)\n\
             sys.stdin.read()\n",
            host,
            port,
            &count.to_string(),
            first,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line.trim(), "held");
    holder
}

/// A stop does not wait for a request head still arriving. A connection
/// that had sent the start of a head and then nothing (a slow client, or
/// one that means to hold the server) held the stop for its whole grace
/// (10 s), and the log said `shutdown grace period over`. Now it is
/// closed a second after the stop began, as one giving way is.
#[tokio::test]
async fn a_stop_does_not_wait_for_a_head_still_arriving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = Server::start_with(ServerOptions::default()).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send");
    // A request after it, on another connection, is answered: the
    // server has had the chance to read the head's start.
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
    let status = s.terminate();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let waited = s.log_lines("shutdown grace period over");
    assert!(waited.is_empty(), "{waited:?}");
}

#[tokio::test]
async fn json_logs_and_graceful_sigterm() {
    let mut s = roboger_tests::Server::start_with(roboger_tests::ServerOptions::default()).await;
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
    let status = s.terminate();
    assert!(status.success(), "exit after SIGTERM: {status:?}");

    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(server_bin());
    cmd.args(["--log-format", "json", "--listen", "127.0.0.1:0"])
        .env("ROBOGER_DATA_DIR", dir.path())
        .env_remove("ROBOGER_CONFIG");
    let (mut child, _addr, log) = spawn_and_wait_listening(cmd);
    let text = log.text();
    let json_lines = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .inspect(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("each log line is JSON");
        })
        .count();
    assert!(json_lines >= 2, "{text}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A stop (SIGTERM: `kill`, `systemctl stop`, a restart, an upgrade)
/// lets the deliveries in flight finish and writes their outcomes before
/// it stops the plugins, so whoever takes this node's deliveries over
/// (the next start, another node) does not make them again. Before, the
/// stop cut the call short (the plugin was stopped under it), spent an
/// attempt, and dropped even that outcome as late, with a warning: its
/// lease had already been handed over.
#[tokio::test]
async fn a_delivery_in_flight_at_a_stop_is_finished_and_not_made_again() {
    finished_when_stopped(|s| s.signal("TERM")).await;
}

/// `systemctl stop` of the shipped unit: systemd sends SIGTERM to the
/// processes its `KillMode` names (systemd.kill(5)): every process of
/// the unit's control group with `control-group`, the main process
/// alone with `mixed` or `process`. (systemd is not the init of the
/// machines the tests run on, so this sends them itself; the unit's
/// processes are the server and its descendants.) With
/// `control-group`, as the unit said before, the plugins got systemd's
/// SIGTERM too and died under the delivery being made, which was then
/// made again.
#[tokio::test]
async fn systemctl_stop_of_the_shipped_unit_lets_the_delivery_in_flight_finish() {
    let unit =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/roboger-server.service");
    let unit = std::fs::read_to_string(&unit).expect("the shipped unit");
    let mode = unit
        .lines()
        .find_map(|l| l.strip_prefix("KillMode="))
        .unwrap_or("control-group")
        .trim()
        .to_string();
    finished_when_stopped(|s| {
        let pids = match mode.as_str() {
            "control-group" => process_tree(s.pid()),
            "mixed" | "process" => vec![s.pid()],
            other => panic!("KillMode={other}: the server would not be told to stop"),
        };
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    })
    .await;
}

/// `pid` and every process descended from it.
fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // After the command's closing parenthesis: state, then ppid.
            let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?;
            Some((p, ppid.parse().ok()?))
        })
        .collect();
    let mut tree = vec![pid];
    let mut i = 0;
    while let Some(&p) = tree.get(i) {
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// Pushes an event that the test plugin takes 1.5 s to send, stops the
/// server with `stop` once the send has begun, and checks that the send
/// was finished and written as delivered before the server exited.
async fn finished_when_stopped(stop: impl FnOnce(&Server)) {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("rec.jsonl");
    let mut s = Server::start_with(ServerOptions::recording_test_plugin(&record)).await;
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({"slow": 1500})).await;
    assert_status!(s.push(json!({"addr": a, "msg": "in flight"})).await, 202);
    roboger_tests::sends_begun(&record, 1).await;
    stop(&s);
    let status = s.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    let log = s.log_text();
    assert_eq!(
        roboger_tests::plugin_calls(&record, "send").len(),
        1,
        "the send was cut short: {log}"
    );
    // Written before the stop: nothing is left for anyone to make again.
    let db = s.db_client();
    let delivered = "SELECT count(*) FROM delivery \
                     WHERE state = 'delivered' AND attempts = 1 AND last_error IS NULL";
    assert_eq!(
        (
            db.query("SELECT count(*) FROM delivery"),
            db.query(delivered)
        ),
        ("1".to_string(), "1".to_string()),
        "{log}"
    );
    assert!(!log.contains("late outcomes dropped"), "{log}");
}

/// A stop waits for a send that never ends only until the call times out
/// (the server's `timeout`, 2 s here; the SDK gives up just before), and
/// writes that try's outcome: the delivery is retried, one attempt
/// spent, by whoever takes it over.
#[tokio::test]
async fn a_stop_waits_for_a_hanging_send_only_until_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("rec.jsonl");
    let mut s = Server::start_with(ServerOptions::recording_test_plugin(&record)).await;
    let (id, a) = s.new_addr().await;
    s.endpoint(
        id,
        "t",
        json!({"gate": dir.path().join("never").display().to_string()}),
    )
    .await;
    assert_status!(s.push(json!({"addr": a, "msg": "hangs"})).await, 202);
    roboger_tests::sends_begun(&record, 1).await;
    let status = s.terminate();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    let log = s.log_text();
    let db = s.db_client();
    let retried = "SELECT count(*) FROM delivery \
                   WHERE state = 'pending' AND attempts = 1 AND last_error LIKE '%did not finish%'";
    assert_eq!(db.query(retried), "1", "{log}");
    assert!(!log.contains("cut short"), "{log}");
}

/// A second SIGTERM or SIGINT (an operator's second Ctrl-C) stops the
/// server at once, its plugins with it, instead of after the deliveries
/// being made: here one that would hold the stop for 20 s (its
/// `timeout`). Before, the second signal did nothing. The plugin is one
/// that does not exit when its stdin closes (`linger`): the server kills
/// it.
#[tokio::test]
async fn a_second_stop_signal_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("rec.jsonl");
    let recording = ServerOptions::recording_test_plugin(&record);
    let mut s = Server::start_with(ServerOptions {
        yaml: "timeout: 20\n".into(),
        env: [
            recording.env.clone(),
            vec![("TEST_PLUGIN_MODE".into(), "linger".into())],
        ]
        .concat(),
        ..recording
    })
    .await;
    let (id, a) = s.new_addr().await;
    let never = dir.path().join("never").display().to_string();
    s.endpoint(id, "t", json!({ "gate": never })).await;
    assert_status!(s.push(json!({"addr": a, "msg": "hangs"})).await, 202);
    roboger_tests::sends_begun(&record, 1).await;
    let plugin = roboger_tests::plugin_calls(&record, "send_started")[0]["pid"].clone();
    s.signal("TERM");
    s.wait_log("shutting down", Duration::from_secs(10)).await;
    s.signal("TERM");
    let status = s.wait_exit(Duration::from_secs(10));
    let log = s.log_text();
    assert_eq!(status.code(), Some(143), "{log}");
    assert!(log.contains("stopping at once"), "{log}");
    let plugin = plugin.as_u64().expect("the plugin's pid");
    roboger_tests::poll_until(
        Duration::from_secs(5),
        async || match roboger_tests::pid_alive(plugin) {
            false => Ok(()),
            true => Err(format!("the plugin outlived the server: {log}")),
        },
    )
    .await;
}

/// A server out of file descriptors (more clients than its `LimitNOFILE`)
/// says so once, not twenty times a second, though each connection it
/// drops lets one more in; and once it has accepted connections for 3 s
/// without a failure, it says so; it serves as before.
#[tokio::test]
async fn a_server_out_of_file_descriptors_says_so_once_and_recovers() {
    const POOL: usize = 4;
    let s = Server::start_with(ServerOptions {
        yaml: format!("db-pool-size: {POOL}\n"),
        ..Default::default()
    })
    .await;
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
    let pid = s.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("its descriptors")
        .count();
    // The pool opens its connections as work needs them, after this count
    // too (on SQLite each holds the file and its WAL): room for them all,
    // and for four clients, far fewer than the 32 that come.
    let limit = format!("--nofile={}", open + 4 + 3 * POOL);
    let st = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .status()
        .expect("prlimit");
    assert!(st.success(), "prlimit {limit}");
    let addr = s
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    // The kernel completes these connections; the server cannot take the
    // ones past its limit.
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(std::net::TcpStream::connect(&addr).expect("connect"));
    }
    s.wait_log("accept failed", Duration::from_secs(20)).await;
    // Long enough for ten tries of the accept loop (one each 50 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(held);
    // New connections, one at a time, until it says it accepts again.
    poll_every(
        Duration::from_millis(250),
        Duration::from_secs(20),
        async || {
            drop(std::net::TcpStream::connect(&addr));
            match s.log_lines("connections are accepted again").is_empty() {
                true => Err(format!("never said it accepts again: {}", s.log_text())),
                false => Ok(()),
            }
        },
    )
    .await;
    let failed = s.log_lines("accept failed");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(failed[0].contains("Too many open files"), "{}", failed[0]);
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
}

/// Started by hand, where the soft limit on open files is 1024 (below
/// the 4096 connections it takes), the server raises it to the hard
/// limit, and says when even that is short; its plugins keep their own.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=512:2048", "--"])
        .arg(server_bin())
        .args(["--listen", "127.0.0.1:0"])
        .env("ROBOGER_DATA_DIR", dir.path())
        .env_remove("ROBOGER_CONFIG");
    let (mut child, _addr, log) = spawn_and_wait_listening(cmd);
    let limits = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| {
                l.split_whitespace()
                    .skip(3)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    let server = limits(child.id());
    // Its children, through each of its threads (the one that spawned a
    // plugin is its parent).
    let plugins: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .map(|tasks| tasks.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
        .iter()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .map(limits)
        .collect();
    let text = log.text();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(server, "2048 2048", "{text}");
    assert!(!plugins.is_empty(), "no plugin processes: {text}");
    assert!(plugins.iter().all(|l| l == "1024 1024"), "{plugins:?}");
    assert!(
        text.contains("the open files limit (2048) is below the 4096 connections"),
        "{text}"
    );
}

/// A log nobody can read any more (the terminal it was started in hung
/// up, the pipe it was written to lost its reader): the lines are lost,
/// and the server goes on serving. It used to panic at the first line it
/// could not write.
#[tokio::test]
async fn a_log_that_cannot_be_written_does_not_stop_the_server() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(server_bin())
        .args(["--listen", "127.0.0.1:0"])
        .env("ROBOGER_DATA_DIR", dir.path())
        .env_remove("ROBOGER_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn roboger-server");
    let stderr = child.stderr.take().expect("its stderr");
    let mut log = String::new();
    let base = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .inspect(|l| log.push_str(&format!("{l}\n")))
        .find_map(|l| {
            let at = l.find("listening on ")? + "listening on ".len();
            let addr = l[at..].split_whitespace().next()?;
            Some(format!("http://{addr}"))
        });
    // The reader is dropped here: the pipe has no reader from now on.
    let Some(base) = base else {
        let _ = child.kill();
        panic!("the server did not say it listens: {log}");
    };
    let key = std::fs::read_to_string(dir.path().join("master.key")).expect("master.key");
    let key = key.trim();
    // Each management change writes a line; each is lost.
    let mut created = Vec::new();
    for _ in 0..3 {
        let r = client()
            .post(format!("{base}/manage/v2/addr"))
            .header("X-Auth-Key", key)
            .send()
            .await;
        created.push(r.map(|r| r.status().as_u16()).unwrap_or_default());
    }
    let core = core_status(&base, key).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert_eq!(created, [201, 201, 201], "exit: {status:?}");
    assert_eq!(core, 200);
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/roboger-server.service"
    ))
    .unwrap();
    for needed in [
        "DynamicUser=yes",
        "StateDirectory=roboger",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    if !installed("systemd-analyze") {
        return;
    }
    // Verify the unit as shipped, pointed at the binary we built.
    let dir = tempfile::tempdir().unwrap();
    let unit = unit.replace("/usr/bin/roboger-server", server_bin().to_str().unwrap());
    let path = write(dir.path(), "roboger-server.service", &unit);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {err}");
    let complaints: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("roboger-server.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze complains: {complaints:?}"
    );
    // The hardening keeps its grade (1.7 "OK" when it was first measured).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure: {text}"));
    let level: f64 = overall
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no level in {overall:?}"));
    assert!(
        level <= 1.7 && overall.contains("OK"),
        "exposure worse than 1.7 OK: {overall}"
    );
}

/// Every JSON log line that mentions an event carries it as `event_id`,
/// and those about a delivery also `endpoint_id` and `plugin`, so one
/// event can be followed from its push to its delivery.
#[tokio::test]
async fn json_log_lines_follow_one_event_by_its_fields() {
    let s = roboger_tests::Server::start_with(roboger_tests::ServerOptions {
        plugins: vec!["t".into()],
        yaml: "delivery:\n  retry-base: 0.05\n".into(),
        env: vec![
            ("ROBOGER_LOG_FORMAT".into(), "json".into()),
            ("RUST_LOG".into(), "roboger_server=debug".into()),
        ],
        ..Default::default()
    })
    .await;
    let (id, a) = s.new_addr().await;
    let ep = s
        .endpoint(id, "t", serde_json::json!({"fail_times": 1}))
        .await;
    assert_status!(
        s.push(serde_json::json!({"addr": a, "msg": "follow me"}))
            .await,
        202
    );
    let e = s.wait_settled(id).await;
    let event = e["id"].as_str().expect("event id").to_string();
    assert_eq!(e["deliveries"][0]["state"], "delivered", "{e}");
    s.wait_log("\"delivered\"", std::time::Duration::from_secs(5))
        .await;
    let about: Vec<serde_json::Value> = s
        .log_lines(&event)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for line in &about {
        assert_eq!(line["event_id"], event.as_str(), "{line}");
    }
    let messages: Vec<&str> = about.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(messages.contains(&"push accepted"), "{messages:?}");
    for wanted in ["delivery failed, will retry", "delivered"] {
        let line = about
            .iter()
            .find(|l| l["message"].as_str().is_some_and(|m| m.starts_with(wanted)))
            .unwrap_or_else(|| panic!("no {wanted:?} line in {messages:?}"));
        assert_eq!(line["endpoint_id"], ep, "{line}");
        assert_eq!(line["plugin"], "t", "{line}");
    }
}

/// What keeps the database from answering for a while: on SQLite another
/// process holding the file's exclusive lock (as a disk stalled in the
/// `fsync` of a new file's switch to WAL does), elsewhere a port whose
/// connections the kernel takes but nobody answers, until a relay to the
/// real server starts accepting them.
enum NotYet {
    Locked(roboger_tests::SqliteLock),
    Silent {
        port: std::net::TcpListener,
        to: String,
    },
}

impl NotYet {
    /// Takes `db`'s database away; returns the URL the server is to use.
    fn take(db: &str) -> (NotYet, String) {
        if let Some(path) = db.strip_prefix("sqlite://") {
            let lock = roboger_tests::SqliteLock::take(std::path::Path::new(path));
            return (NotYet::Locked(lock), db.to_string());
        }
        let mut url = url::Url::parse(db).expect("a database URL");
        let to = format!(
            "{}:{}",
            url.host_str().expect("a host"),
            url.port().expect("a port")
        );
        // Kept bound (so no other test can take it), not accepted from.
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let number = port.local_addr().expect("its address").port();
        url.set_port(Some(number)).expect("a port");
        (NotYet::Silent { port, to }, url.to_string())
    }

    /// Lets the server reach its database.
    async fn give(self) {
        match self {
            NotYet::Locked(lock) => drop(lock),
            NotYet::Silent { port, to } => {
                port.set_nonblocking(true).expect("nonblocking");
                let listener = tokio::net::TcpListener::from_std(port).expect("the port");
                tokio::spawn(async move {
                    while let Ok((mut from, _)) = listener.accept().await {
                        let to = to.clone();
                        tokio::spawn(async move {
                            if let Ok(mut db) = tokio::net::TcpStream::connect(&to).await {
                                let _ = tokio::io::copy_bidirectional(&mut from, &mut db).await;
                            }
                        });
                    }
                });
            }
        }
    }
}

/// A server started before its database can answer (started at the same
/// moment, or a disk stalled on a flush) waits for it, saying so, rather
/// than exiting after one `timeout` (2 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_waits_for_a_database_that_cannot_answer_yet() {
    let dir = tempfile::tempdir().unwrap();
    let (not_yet, url) = NotYet::take(&roboger_tests::fresh_database(dir.path()));
    let starting = roboger_tests::Server::spawn(roboger_tests::ServerOptions {
        db: Some(url),
        ..Default::default()
    });
    // Said after a first attempt of 2 s: where the server used to exit.
    starting
        .wait_log(
            "the database does not answer yet; trying again",
            std::time::Duration::from_secs(10),
        )
        .await;
    not_yet.give().await;
    // `wait` blocks this thread; the relay runs on the runtime's workers.
    let s = starting.wait();
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
    let (_, a) = s.new_addr().await;
    assert_status!(
        s.push(serde_json::json!({"addr": a, "msg": "hi"})).await,
        202
    );
}

/// A database server that refuses connections (a wrong port, a server
/// not started yet) is waited for like one that cannot answer yet, and the
/// warning says it refused: sqlx's pool only says no connection came
/// within the timeout. Nothing listens on the port, so this runs the same
/// in every suite.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_connection_is_named_while_the_server_waits() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    for url in [
        format!("postgresql://postgres@127.0.0.1:{closed}/roboger"),
        format!("mysql://root@127.0.0.1:{closed}/roboger"),
    ] {
        let starting = roboger_tests::Server::spawn(roboger_tests::ServerOptions {
            db: Some(url),
            ..Default::default()
        });
        starting
            .wait_log(
                "the database does not answer yet; trying again \
                 error=no connection within 2s (`timeout`): \
                 error communicating with database: Connection refused",
                std::time::Duration::from_secs(15),
            )
            .await;
        starting.kill();
    }
}

/// `roboger-server migrate` on the database `db` with `timeout` (seconds):
/// its exit code and standard error.
fn migrate(dir: &std::path::Path, db: &str, timeout: u64) -> (i32, String) {
    let p = write(
        dir,
        "r.yml",
        &format!("roboger:\n  db: {db}\n  timeout: {timeout}\n  master:\n    key: k\n"),
    );
    let (code, _, err) = run_server_cmd(&["--config", p.to_str().unwrap(), "migrate"], &[]);
    (code, err)
}

/// A database that can never be opened stops the start, its error said
/// once (not once per layer that wraps it).
#[test]
fn a_database_that_cannot_be_opened_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = migrate(dir.path(), "sqlite:////dev/null/roboger.db", 2);
    assert_eq!(code, 2, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("roboger-server: cannot connect to the database: "),
        "{err}"
    );
    assert_eq!(last.matches("/dev/null").count(), 1, "{last}");
}

/// A database that refuses the server (no such database on PostgreSQL
/// and MariaDB, a file that is not a database on SQLite) stops the start
/// at once: only a database that cannot answer yet is waited for.
#[test]
fn a_database_that_refuses_the_server_stops_the_start_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = roboger_tests::fresh_database(dir.path());
    let (url, cause) = if fresh.starts_with("sqlite:") {
        std::fs::write(dir.path().join("roboger.db"), [b'x'; 4096]).unwrap();
        (fresh, "file is not a database")
    } else {
        let mut url = url::Url::parse(&fresh).expect("the test database's URL");
        url.set_path("/roboger_no_such_database");
        (url.to_string(), "roboger_no_such_database")
    };
    let began = std::time::Instant::now();
    let (code, err) = migrate(dir.path(), &url, 2);
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("does not answer yet"), "tried again: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("roboger-server: cannot connect to the database: ")
            && last.contains(cause),
        "{err}"
    );
    // Trying again would go on for 30 s.
    assert!(
        began.elapsed() < std::time::Duration::from_secs(20),
        "took {:?}",
        began.elapsed()
    );
}

/// A database that never answers is not waited for forever: the start
/// gives up after 30 s (three `timeout`s would be no more here), saying
/// how long it tried. The deadline is the same code on every backend
/// (which errors are tried again, what differs, is for the tests above),
/// so the 30 s are waited in the SQLite suite only.
#[test]
fn a_start_gives_up_on_a_database_that_never_answers() {
    gives_up_on_a_locked_file(2);
}

/// The same with a `timeout` longer than SQLite's busy handler (5 s): each
/// attempt then ends on `SQLITE_BUSY` rather than on the timeout, and is
/// warned about and given up on all the same (naming the lock as why).
#[test]
fn a_start_gives_up_on_a_sqlite_file_that_stays_busy() {
    gives_up_on_a_locked_file(10);
}

fn gives_up_on_a_locked_file(timeout: u64) {
    if roboger_tests::on_postgres() || roboger_tests::on_mysql() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (not_yet, url) = NotYet::take(&roboger_tests::fresh_database(dir.path()));
    let (code, err) = migrate(dir.path(), &url, timeout);
    drop(not_yet);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("the database does not answer yet; trying again"),
        "{err}"
    );
    let last = err.lines().last().unwrap_or_default();
    // Why, in the server's own words, right after what failed.
    let why = if timeout < 5 {
        format!("no connection within {timeout}s (`timeout`)")
    } else {
        "the SQLite file is locked by another process".to_string()
    };
    assert!(
        last.starts_with(&format!(
            "roboger-server: cannot connect to the database: {why}; gave up"
        )),
        "{last}"
    );
    let tried: u64 = last
        .split_once("gave up after trying for ")
        .and_then(|(_, s)| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no give-up in {last:?}"));
    // The last attempt may run up to one busy handler past the deadline.
    assert!((25..=36).contains(&tried), "{last}");
}

/// A SQLite file the server may not write, in a directory it may (a
/// backup restored by root into the service's directory, say), stops the
/// start with exit code 2, saying so. Before, the server said it
/// listened and answered every push 503. The file is made read-only by
/// a read-only bind mount in a mount namespace of the server's own
/// (`unshare`), which binds root too.
#[test]
fn a_database_file_the_server_may_not_write_stops_the_start() {
    if roboger_tests::on_postgres() || roboger_tests::on_mysql() {
        return; // the server's own file system matters on SQLite only
    }
    let dir = tempfile::tempdir().unwrap();
    let (db, config) = on_sqlite_file(dir.path());
    let config = config.display().to_string();
    let (code, _, err) = run_server_cmd(&["--config", &config, "migrate"], &[]);
    assert_eq!(code, 0, "{err}");
    let read_only = "mount --bind \"$0\" \"$0\" && mount -o remount,bind,ro \"$0\"";
    let unshare = |then: &str| {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--map-root-user", "sh", "-c"])
            .arg(format!("{read_only}{then}"))
            .arg(&db)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    if !unshare("").status().is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("ROBOGER_TEST_REQUIRE_ALL").is_none(),
            "cannot bind-mount a file read-only in a mount namespace (unshare --mount --map-root-user)"
        );
        eprintln!("SKIPPED: cannot bind-mount a file read-only in a mount namespace here");
        return;
    }
    let mut server = unshare(" && exec \"$@\"")
        .arg(server_bin())
        .args(["--config", &config])
        .env_remove("ROBOGER_DB")
        .spawn()
        .expect("the server, in its namespace");
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.try_wait().expect("the server's status") {
            break status;
        }
        if std::time::Instant::now() > end {
            let _ = server.kill();
            let out = server.wait_with_output().expect("its output");
            panic!(
                "the server started on a database it may not write: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = server.wait_with_output().expect("its output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(2), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "roboger-server: cannot start: the database takes no writes from this server"
        ) && last.contains("attempt to write a readonly database"),
        "{last}"
    );
}

/// A database URL with no host, naming the server's Unix socket as the
/// original's drivers took it: `postgresql://user@/db` (libpq's, for peer
/// authentication as the service's own user; the socket directory in
/// `$PGHOST`) and `mysql+pymysql://user@/db?unix_socket=PATH`. The server
/// connects through the socket. (SQLite has no server.)
#[tokio::test]
async fn a_database_url_without_a_host_goes_through_the_unix_socket() {
    if !roboger_tests::on_postgres() && !roboger_tests::on_mysql() {
        eprintln!("SKIPPED: PostgreSQL and MySQL only (the suite runs on both too)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let tcp = roboger_tests::fresh_database(dir.path());
    let sql = roboger_tests::DbClient::of(&tcp);
    let parsed = url::Url::parse(&tcp).expect("a URL");
    let (user, name) = (parsed.username(), parsed.path().trim_start_matches('/'));
    // Each server's word for its sessions that came through the socket.
    let (db, env, through_socket) = if roboger_tests::on_postgres() {
        let sockets = sql.query("SHOW unix_socket_directories");
        let socket_dir = sockets.split(',').next().unwrap_or_default().trim();
        (
            format!(
                "postgresql://{user}@/{name}?port={}",
                sql.query("SHOW port")
            ),
            vec![("PGHOST".to_string(), socket_dir.to_string())],
            format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = '{name}' AND client_addr IS NULL"
            ),
        )
    } else {
        (
            format!(
                "mysql+pymysql://{user}@/{name}?unix_socket={}",
                sql.query("SELECT @@socket")
            ),
            Vec::new(),
            format!(
                "SELECT count(*) FROM information_schema.processlist \
                 WHERE db = '{name}' AND host = 'localhost'"
            ),
        )
    };
    let s = Server::start_with(ServerOptions {
        db: Some(db),
        env,
        ..Default::default()
    })
    .await;
    let (id, _) = s.new_addr().await;
    assert_eq!(sql.query("SELECT id FROM addr"), id.to_string());
    // This client's own session is on TCP.
    let n = sql.query(&through_socket);
    assert!(n.parse::<u32>().is_ok_and(|n| n > 0), "{n}");
}

/// The SQLite database the server makes, with its journals, is readable
/// to the server's user alone: it holds endpoints' secrets (tokens,
/// passwords) and console sessions. Before, it was made with the umask's
/// mode, 0644 outside systemd, so every user of the host could read it
/// where the operator's `db` put it in a directory they may enter. A
/// database made before is left as it is, and each start says it is
/// readable while it is.
#[tokio::test]
async fn the_database_the_server_makes_is_its_user_s_alone() {
    if roboger_tests::on_postgres() || roboger_tests::on_mysql() {
        return; // the server's own files matter on SQLite only
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let chmod = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod(dir.path(), 0o755);
    let (db, config) = on_sqlite_file(dir.path());
    let start = || {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "umask 022; exec \"$0\" \"$@\""])
            .arg(server_bin())
            .arg("--config")
            .arg(&config)
            .env_remove("ROBOGER_DB")
            .env_remove("ROBOGER_CONFIG");
        spawn_and_wait_listening(cmd)
    };
    let readable = "is readable to every user of the host";
    let (child, _, log) = start();
    let mode = |suffix: &str| {
        let mut path = db.clone().into_os_string();
        path.push(suffix);
        std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    for suffix in ["", "-wal", "-shm", "-migrate.lock"] {
        assert_eq!(mode(suffix), 0o600, "roboger.db{suffix}: {}", log.text());
    }
    assert!(!log.text().contains(readable), "{}", log.text());
    stops_cleanly(child, &log);
    // Made readable by hand (or by a build before): said at each start.
    chmod(&db, 0o644);
    let (child, _, log) = start();
    let said = format!(
        "WARN roboger_server::store::sqlite_file: the database {} {readable} (mode 0644)",
        db.display()
    );
    assert!(log.text().contains(&said), "{}", log.text());
    stops_cleanly(child, &log);
    // In a directory others may not enter, it is not.
    chmod(dir.path(), 0o700);
    let (child, _, log) = start();
    assert!(!log.text().contains(readable), "{}", log.text());
    stops_cleanly(child, &log);
}

/// A `RUST_LOG` the log's filter cannot use is said, and the default
/// filter logs in its place; an empty one is as none. Before, a
/// misspelt level (`roboger_server=dbug`) was dropped without a word, so
/// the operator who asked for debug lines got none and no reason.
#[tokio::test]
async fn a_rust_log_the_filter_cannot_use_is_said() {
    let with = |rust_log: &str| ServerOptions {
        env: vec![("RUST_LOG".into(), rust_log.into())],
        ..Default::default()
    };
    let s = Server::start_with(with("info,roboger_server=dbug")).await;
    let said = s.log_lines("RUST_LOG is not a filter the log can use");
    assert_eq!(said.len(), 1, "{}", s.log_text());
    assert!(
        said[0].contains("WARN") && said[0].contains("\"info,roboger_server=dbug\""),
        "{said:?}"
    );
    assert!(
        said[0].ends_with(
            "logging with the default, info,sqlx_core::pool::connection=error,sqlx::postgres::notice=warn"
        ),
        "{said:?}"
    );
    drop(s);
    let s = Server::start_with(with(" ")).await;
    assert!(
        s.log_text().contains("INFO roboger_server: roboger-server"),
        "{}",
        s.log_text()
    );
    assert!(s.log_lines("RUST_LOG").is_empty(), "{}", s.log_text());
}

/// `check-config` says which plugins' executables cannot run: a command
/// that is not there, one that is not executable, a plugin with no
/// command and no built-in of its name. Before, it answered
/// "configuration OK" to each, and the start or the reload that
/// followed met the plugin refused or crash-looping.
#[test]
fn check_config_names_plugins_that_cannot_run() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let script = write(dir.path(), "plugin.sh", "#!/bin/sh\n");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    // One pinned right, one pinned to what it held before an upgrade.
    let pinned = write(dir.path(), "pinned.sh", "#!/bin/sh\n# 2\n");
    std::fs::set_permissions(&pinned, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (now, before) = (
        sha256_hex(b"#!/bin/sh\n# 2\n"),
        sha256_hex(b"#!/bin/sh\n# 1\n"),
    );
    let p = write(
        dir.path(),
        "r.yml",
        &format!(
            "roboger:\n  master:\n    key: k\n  plugins:\n    - name: webhook\n    \
             - name: gone\n      command: /nonexistent/roboger-plugin-gone\n    \
             - name: plain\n      command: {}\n    - name: nobuiltin\n    \
             - name: right\n      command: {pin}\n      sha256: {now}\n    \
             - name: upgraded\n      command: {pin}\n      sha256: {before}\n",
            script.display(),
            pin = pinned.display(),
        ),
    );
    let (code, out, err) = run_server_cmd(&["--config", p.to_str().unwrap(), "check-config"], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(!out.contains("configuration OK"), "{out}");
    let said = format!(
        "roboger-server: plugin gone: its command /nonexistent/roboger-plugin-gone is not a \
         file; plugin plain: {} is not executable; plugin nobuiltin: roboger-plugin-nobuiltin \
         is installed neither beside the server, nor in ../lib/roboger from it, nor on PATH: \
         give the plugin its command; plugin upgraded: executable {pin} has SHA-256 {now}, \
         but the config pins {before}",
        script.display(),
        pin = pinned.display(),
    );
    assert_eq!(err.trim_end().lines().last(), Some(said.as_str()), "{err}");
}

/// A migration PostgreSQL refuses is said once, in PostgreSQL's words.
/// A database user without `CREATE` on schema `public` (PostgreSQL 15's
/// default for users other than the database's owner) got
/// `permission denied for schema public: … permission denied for schema
/// public at line 3655`: the error twice, the second time with the line
/// of PostgreSQL's C source that raised it. (PostgreSQL only.)
#[test]
fn a_refused_migration_is_said_once_in_postgresql_s_words() {
    if !roboger_tests::on_postgres() {
        return;
    }
    let db = roboger_tests::fresh_database(std::path::Path::new("/nonexistent"));
    let mut url = url::Url::parse(&db).expect("a URL");
    let user = url.path().trim_start_matches('/').to_string();
    roboger_tests::DbClient::of(&db).query(&format!(
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC; CREATE ROLE {user} LOGIN"
    ));
    url.set_username(&user).expect("a user name");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let (code, _, err) = run_server_cmd(
        &["migrate"],
        &[("ROBOGER_DB", url.as_str()), ("ROBOGER_DATA_DIR", &data)],
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.trim_end().lines().last(),
        Some(
            "roboger-server: cannot apply database migrations: database error: Execution \
             Error: error returned from database: permission denied for schema public"
        ),
        "{err}"
    );
}

/// `check-config` writes nothing: with no master key given or stored it
/// says where the first start will generate one. It generated one, made
/// the data directory for it and printed it as the server's key: an
/// operator checking the packaged configuration as root got a key in
/// root's data directory, which the service (whose data directory is its
/// own) never used, and was refused with it. `migrate` writes the
/// database alone (in a data directory its user's alone, as a start
/// makes it).
#[test]
fn check_config_and_migrate_generate_no_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_env = data.display().to_string();
    let env = [("ROBOGER_DATA_DIR", data_env.as_str())];
    let (code, out, err) = run_server_cmd(&["check-config"], &env);
    assert_eq!(code, 0, "{err}");
    let key = data.join("master.key");
    assert!(
        out.contains(&format!(
            "  master key: none yet; the first start generates one in {}\n",
            key.display()
        )) && !out.contains("Generated"),
        "{out}"
    );
    assert!(!data.exists(), "check-config made {}", data.display());
    let (code, out, err) = run_server_cmd(&["migrate"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("Generated") && !key.exists(), "{out}");
    assert!(data.join("roboger.db").is_file());
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", data.display());
    std::fs::remove_dir_all(&data).unwrap();
    // A stored key is the one a start uses: nothing said of it.
    std::fs::create_dir(&data).unwrap();
    std::fs::write(&key, "stored-key\n").unwrap();
    let (code, out, err) = run_server_cmd(&["check-config"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("master key"), "{out}");
}
