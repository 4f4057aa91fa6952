//! The Debian package that `tests/run` builds with cargo-deb
//! (`ROBOGER_TEST_DEB`): its control data, then unpacked into a temporary
//! root, the installed server starts on its embedded default under a
//! state directory, finds its built-in plugins in `/usr/lib/roboger` and
//! delivers an event through one of them.

use std::path::{Path, PathBuf};
use std::process::Command;

use roboger_tests::{HttpSink, Method, client, json, spawn_and_wait_listening};

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .expect("run dpkg-deb");
    assert!(
        out.status.success(),
        "dpkg-deb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn the_package() -> Option<PathBuf> {
    match std::env::var_os("ROBOGER_TEST_DEB") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            assert!(
                std::env::var_os("ROBOGER_TEST_REQUIRE_ALL").is_none(),
                "ROBOGER_TEST_DEB is not set; tests/run builds the package"
            );
            eprintln!("SKIPPED: no package (ROBOGER_TEST_DEB); tests/run builds it");
            None
        }
    }
}

#[tokio::test]
async fn the_installed_package_starts_lists_its_plugins_and_delivers() {
    let Some(deb) = the_package() else { return };
    let fields = dpkg_deb(&["-f"], &deb);
    assert!(fields.contains("Package: roboger-server"), "{fields}");
    assert!(fields.contains("Depends: libc6"), "{fields}");
    let conffiles = dpkg_deb(&["-I"], &deb);
    let control = tempfile::tempdir().expect("tempdir");
    let out = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(control.path())
        .status()
        .expect("dpkg-deb -e");
    assert!(out.success());
    let listed = std::fs::read_to_string(control.path().join("conffiles")).expect("conffiles");
    for f in ["/etc/roboger/roboger.yml", "/etc/default/roboger-server"] {
        assert!(
            listed.lines().any(|l| l == f),
            "{f} is no conffile: {listed}"
        );
    }
    // The unit's environment is where the secrets go: only root (systemd)
    // reads it, while the example configuration is readable to all.
    let listing = dpkg_deb(&["-c"], &deb);
    let mode = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(path))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("{path} is not in the package: {listing}"))
            .to_string()
    };
    assert_eq!(mode("./etc/default/roboger-server"), "-rw-------");
    assert_eq!(mode("./etc/roboger/roboger.yml"), "-rw-r--r--");
    let postinst = std::fs::read_to_string(control.path().join("postinst")).expect("postinst");
    assert!(
        postinst.contains("deb-systemd-helper enable roboger-server.service"),
        "{conffiles}\n{postinst}"
    );

    let root = tempfile::tempdir().expect("tempdir");
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(root.path())
        .status()
        .expect("dpkg-deb -x");
    assert!(out.success());
    let r = root.path();
    let server = r.join("usr/bin/roboger-server");
    for p in [
        "usr/lib/systemd/system/roboger-server.service",
        "etc/roboger/roboger.yml",
        "usr/lib/roboger/roboger-plugin-python",
    ] {
        assert!(r.join(p).is_file(), "{p} is not in the package");
    }
    let unit = std::fs::read_to_string(r.join("usr/lib/systemd/system/roboger-server.service"))
        .expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/roboger-server"), "{unit}");

    // The example configuration is valid as shipped.
    let out = Command::new(&server)
        .args(["check-config", "--config"])
        .arg(r.join("etc/roboger/roboger.yml"))
        .output()
        .expect("run the installed server");
    assert!(
        out.status.success(),
        "check-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No configuration: the embedded default in the state directory.
    let state = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(&server);
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("STATE_DIRECTORY", state.path())
        .env_remove("ROBOGER_CONFIG")
        .env_remove("ROBOGER_DATA_DIR")
        .env_remove("ROBOGER_DB")
        .env_remove("ROBOGER_MASTERKEY");
    let (mut child, addr, _log) = spawn_and_wait_listening(cmd);
    let key = std::fs::read_to_string(state.path().join("master.key"))
        .expect("the generated key is kept in the state directory");
    let key = key.trim();
    assert!(state.path().join("roboger.db").is_file());
    let base = format!("http://{addr}");
    let http = client();
    let manage = |method: Method, path: &str, body: Option<serde_json::Value>| {
        let mut rb = http
            .request(method, format!("{base}/manage/v2{path}"))
            .header("X-Auth-Key", key)
            .header("Accept", "*/*");
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        rb.send()
    };
    let plugins: serde_json::Value = manage(Method::GET, "/plugin", None)
        .await
        .expect("GET /plugin")
        .json()
        .await
        .expect("JSON");
    let names: Vec<&str> = plugins
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|p| p["plugin_name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["chain", "email", "shell", "slack", "telegram", "webhook"],
        "{plugins}"
    );
    let webhook = plugins
        .as_array()
        .and_then(|l| l.iter().find(|p| p["plugin_name"] == "webhook"))
        .expect("webhook");
    assert_eq!(webhook["state"], "running", "{webhook}");

    let sink = HttpSink::start(vec![]).await;
    let a: serde_json::Value = manage(Method::POST, "/addr", None)
        .await
        .expect("POST /addr")
        .json()
        .await
        .expect("JSON");
    let (id, a) = (a["id"].as_i64().expect("id"), a["a"].as_str().expect("a"));
    let ep: serde_json::Value = manage(
        Method::POST,
        &format!("/addr/{id}/endpoint"),
        Some(json!({"plugin_name": "webhook", "config": {"url": format!("{}/hook", sink.base), "template": "{\"msg\": $msg}"}})),
    )
    .await
    .expect("POST endpoint")
    .json()
    .await
    .expect("JSON");
    let ep = ep["id"].as_i64().expect("endpoint id");
    let sub = manage(
        Method::POST,
        &format!("/addr/{id}/endpoint/{ep}/subscription"),
        Some(json!({"level": 10})),
    )
    .await
    .expect("POST subscription");
    assert_eq!(sub.status().as_u16(), 201);
    let r = http
        .post(format!("{base}/push"))
        .json(&json!({"addr": a, "msg": "from the package"}))
        .send()
        .await
        .expect("push");
    assert_eq!(r.status().as_u16(), 202);
    let got = sink.wait(1).await;
    assert!(
        String::from_utf8_lossy(&got[0].body).contains("from the package"),
        "{:?}",
        got[0].body
    );
    let _ = child.kill();
    let _ = child.wait();
}
