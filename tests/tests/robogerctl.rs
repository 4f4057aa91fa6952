//! The real management client, `robogerctl` 2.0.14 from PyPI, unmodified,
//! against our server. `tests/run` installs it into a virtualenv and
//! passes its path in `ROBOGER_TEST_ROBOGERCTL`.

use roboger_tests::robogerctl::{Ctl, robogerctl_path};
use roboger_tests::{Server, ServerOptions};

#[tokio::test]
async fn robogerctl_drives_every_resource() {
    let Some(bin) = robogerctl_path() else { return };
    let s = Server::start_with(ServerOptions {
        plugins: vec!["webhook".into(), "email".into()],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::new(bin, &s, dir.path());

    let t = ctl.json(&["test"]);
    assert_eq!(t["master"], true);
    assert_eq!(t["version"], env!("CARGO_PKG_VERSION"));
    let (ok, out, _) = ctl.run(&["test"]);
    assert!(ok && out.contains("version"), "{out}");

    let plugins = ctl.json(&["plugin", "list"]);
    let names: Vec<&str> = plugins
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["plugin_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["email", "webhook"]);

    // addr create / list / describe / disable / enable / change / delete
    let a = ctl.json(&["addr", "create"]);
    let id = a["res"].as_i64().unwrap().to_string();
    assert_eq!(a["a"].as_str().unwrap().len(), 64);
    assert_eq!(a["active"], 1);
    let list = ctl.json(&["addr", "list"]);
    assert_eq!(list[0]["res"].to_string(), id);
    let (ok, out, _) = ctl.run(&["addr", "list"]);
    assert!(
        ok && out.contains("res") && out.contains(a["a"].as_str().unwrap()),
        "table output: {out}"
    );
    assert_eq!(ctl.json(&["addr", "describe", &id])["a"], a["a"]);
    ctl.ok(&["addr", "disable", &id]);
    assert_eq!(ctl.json(&["addr", "describe", &id])["active"], 0);
    ctl.ok(&["addr", "enable", &id]);
    assert_eq!(ctl.json(&["addr", "describe", &id])["active"], 1);
    let (ok, out, err) = ctl.run(&["addr", "change", &id]);
    assert!(ok, "{err}");
    let new_a = out.trim().to_string();
    assert_eq!(new_a.len(), 64);
    assert_ne!(new_a, a["a"].as_str().unwrap());
    let wanted = "w".repeat(64);
    let (ok, out, err) = ctl.run(&["addr", "change", &id, "--to", &wanted]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), wanted);
    assert_eq!(
        ctl.json(&["addr", "describe", &wanted])["res"].to_string(),
        id
    );

    // endpoint create / apply / copysub / delete
    let ep = ctl.json(&["endpoint", "create", &id, "webhook"]);
    let ep_res = ep["res"].as_str().unwrap().to_string();
    assert_eq!(
        ep_res,
        format!("{id}.{}", ep_res.split('.').nth(1).unwrap())
    );
    assert_eq!(ep["plugin_name"], "webhook");
    let apply = dir.path().join("ep.yml");
    std::fs::write(
        &apply,
        "config:\n  url: http://127.0.0.1:9/hook\ndescription: my hook\n",
    )
    .unwrap();
    ctl.ok(&["endpoint", "apply", &ep_res, "-f", apply.to_str().unwrap()]);
    let d = ctl.json(&["endpoint", "describe", &ep_res]);
    assert_eq!(
        (
            d["config"]["url"].as_str(),
            d["description"].as_str(),
            d["active"].as_i64()
        ),
        (Some("http://127.0.0.1:9/hook"), Some("my hook"), Some(1))
    );
    ctl.ok(&["endpoint", "disable", &ep_res]);
    assert_eq!(ctl.json(&["endpoint", "describe", &ep_res])["active"], 0);
    let (ok, _, err) = ctl.run(&["endpoint", "create", &id, "pigeon"]);
    assert!(!ok);
    assert!(err.contains("pigeon"), "{err}");

    // subscription create / apply / list / delete
    let sub = ctl.json(&["subscription", "create", &ep_res]);
    let sub_res = sub["res"].as_str().unwrap().to_string();
    assert!(sub_res.starts_with(&format!("{ep_res}.")));
    assert_eq!(
        (sub["level"].as_i64(), sub["level_match"].as_str()),
        (Some(20), Some("ge"))
    );
    let apply = dir.path().join("sub.yml");
    std::fs::write(&apply, "level: warning\nlevel_match: gt\nlocation: lab\n").unwrap();
    ctl.ok(&[
        "subscription",
        "apply",
        &sub_res,
        "-f",
        apply.to_str().unwrap(),
    ]);
    let subs = ctl.json(&["subscription", "list", &ep_res]);
    assert_eq!(subs.as_array().unwrap().len(), 1);
    let s0 = &subs[0];
    assert_eq!(
        (
            s0["level"].as_i64(),
            s0["level_match"].as_str(),
            s0["location"].as_str(),
            s0["tag"].is_null()
        ),
        (Some(30), Some("g"), Some("lab"), true)
    );
    ctl.ok(&["subscription", "disable", &sub_res]);
    assert_eq!(
        ctl.json(&["subscription", "describe", &sub_res])["active"],
        0
    );

    let ep2 = ctl.json(&["endpoint", "create", &id, "email"]);
    let ep2_res = ep2["res"].as_str().unwrap().to_string();
    ctl.json(&["subscription", "create", &ep2_res]);
    ctl.ok(&["endpoint", "copysub", &ep_res, &ep2_res, "--replace"]);
    let copied = ctl.json(&["subscription", "list", &ep2_res]);
    assert_eq!(copied.as_array().unwrap().len(), 1);
    assert_eq!(copied[0]["location"], "lab");

    ctl.ok(&["subscription", "delete", &sub_res]);
    // An empty list prints nothing.
    let (ok, out, _) = ctl.run(&["-o", "json", "subscription", "list", &ep_res]);
    assert!(ok && out.trim().is_empty(), "{out}");
    ctl.ok(&["endpoint", "delete", &ep2_res]);
    let eps = ctl.json(&["endpoint", "list", &id]);
    assert_eq!(eps.as_array().unwrap().len(), 1);
    ctl.ok(&["addr", "delete", &id]);
    let (ok, _, err) = ctl.run(&["addr", "describe", &id]);
    assert!(!ok && err.contains("not found"), "{err}");
}

#[tokio::test]
async fn robogerctl_deploy_with_delete_everything() {
    let Some(bin) = robogerctl_path() else { return };
    let s = Server::start_with(ServerOptions {
        plugins: vec!["webhook".into(), "email".into()],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ctl = Ctl::new(bin, &s, dir.path());
    let stale = ctl.json(&["addr", "create"]);

    let fixed = "d".repeat(64);
    let deploy = format!(
        "version: 2
addrs:
  - a: {fixed}
    endpoints:
      - plugin_name: webhook
        description: ops hook
        config:
          url: http://127.0.0.1:9/ops
        subscriptions:
          - level: warning
            location: lab
          - level: critical
            level_match: e
            tag: disk
      - plugin_name: email
        active: 0
        config:
          rcpt: ops@example.com
  - active: 0
"
    );
    let path = dir.path().join("deploy.yml");
    std::fs::write(&path, deploy).unwrap();
    let out = ctl.json(&[
        "deploy",
        "-f",
        path.to_str().unwrap(),
        "--delete-everything",
    ]);
    let deployed = out["deployed"].as_array().unwrap();
    assert_eq!(deployed.len(), 2);

    let addrs = ctl.json(&["addr", "list"]);
    let addrs = addrs.as_array().unwrap();
    assert_eq!(
        addrs.len(),
        2,
        "delete-everything removed the stale address: {addrs:?}"
    );
    assert!(addrs.iter().all(|a| a["a"] != stale["a"]));
    assert_eq!(addrs[0]["a"], fixed.as_str());
    assert_eq!(addrs[1]["active"], 0);

    let id = addrs[0]["res"].to_string();
    let eps = ctl.json(&["endpoint", "list", &id]);
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), 2);
    assert_eq!(
        (
            eps[0]["plugin_name"].as_str(),
            eps[0]["description"].as_str(),
            eps[0]["active"].as_i64()
        ),
        (Some("webhook"), Some("ops hook"), Some(1))
    );
    assert_eq!(
        (eps[1]["plugin_name"].as_str(), eps[1]["active"].as_i64()),
        (Some("email"), Some(0))
    );
    assert_eq!(eps[1]["config"]["rcpt"], "ops@example.com");
    let subs = ctl.json(&["subscription", "list", eps[0]["res"].as_str().unwrap()]);
    let subs = subs.as_array().unwrap();
    assert_eq!(subs.len(), 2);
    assert_eq!(
        (
            subs[0]["level"].as_i64(),
            subs[0]["level_match"].as_str(),
            subs[0]["location"].as_str()
        ),
        (Some(30), Some("ge"), Some("lab"))
    );
    assert_eq!(
        (
            subs[1]["level"].as_i64(),
            subs[1]["level_match"].as_str(),
            subs[1]["tag"].as_str()
        ),
        (Some(50), Some("e"), Some("disk"))
    );

    // --validate checks the file without touching the server.
    let (ok, _, err) = ctl.run(&["deploy", "-f", path.to_str().unwrap(), "--validate"]);
    assert!(ok, "{err}");
    assert_eq!(ctl.json(&["addr", "list"]).as_array().unwrap().len(), 2);
}
