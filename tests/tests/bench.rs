//! The benchmark still runs end to end: a short run of `roboger-bench`
//! against our server (webhook plugin, sink, plugin SIGKILL) finishes
//! with every accepted event delivered, and `--target` runs the same load
//! against another server it wires through `/manage/v2` and prints both
//! rows and their ratio, and `--nodes 2` measures a cluster. It checks no
//! timing; the figures are for
//! BENCHMARKS.md, made with a release build.

use std::process::Command;

use roboger_tests::{KEY, Server, ServerOptions, bin_dir, plugin_bin};

/// The numbers of the result row that starts with `name`.
fn row_of<'a>(stdout: &'a str, name: &str) -> Vec<&'a str> {
    let row = stdout
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} row:\n{stdout}"));
    row[name.len()..].split_whitespace().collect()
}

#[test]
fn a_short_benchmark_run_delivers_every_accepted_event() {
    let bench = bin_dir().join("roboger-bench");
    assert!(bench.exists(), "build it first: cargo build --workspace");
    let out = Command::new(&bench)
        .args(["--duration", "1", "--connections", "8", "--drain", "60"])
        .output()
        .expect("run roboger-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // accepted/s and delivered/s are the first two numbers; lost is the 8th.
    let cols = row_of(&stdout, "roboger (Rust)");
    let accepted: f64 = cols[0].parse().expect("accepted/s");
    assert!(accepted > 0.0, "nothing was accepted: {cols:?}");
    assert_eq!(cols[7], "0", "events lost: {cols:?}");
    // The last column is the hypervisor's steal during the load, in %.
    let steal: f64 = cols.last().and_then(|c| c.parse().ok()).expect("steal%");
    assert!(
        (0.0..=100.0).contains(&steal),
        "steal% out of range: {cols:?}"
    );
    assert!(
        stdout.contains("0 accepted events lost"),
        "the plugin kill lost events or was not measured:\n{stdout}"
    );
}

#[tokio::test]
async fn target_runs_the_same_load_against_another_server_and_prints_the_ratio() {
    let bench = bin_dir().join("roboger-bench");
    assert!(bench.exists(), "build it first: cargo build --workspace");
    let other = Server::start_with(ServerOptions {
        plugins_yaml: format!(
            "- name: webhook\n  command: {}\n",
            plugin_bin("webhook").display()
        ),
        ..Default::default()
    })
    .await;
    let out = tokio::process::Command::new(&bench)
        .args(["--duration", "1", "--connections", "4", "--drain", "60"])
        .args(["--no-kill", "--max-inflight", "4"])
        .args(["--target", &other.base, "--target-key", KEY])
        .output()
        .await
        .expect("run roboger-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for name in ["roboger (Rust)", &format!("target {}", other.base)] {
        let cols = row_of(&stdout, name);
        let delivered: f64 = cols[1].parse().expect("delivered/s");
        assert!(delivered > 0.0, "{name} delivered nothing: {cols:?}");
        assert_eq!(cols[7], "0", "{name} lost events: {cols:?}");
    }
    assert!(
        stdout.contains("ratio (ours / target): accepted "),
        "no ratio line:\n{stdout}"
    );
}

/// `--nodes 2` runs two of our servers on one database (the suite's
/// PostgreSQL or MySQL when it has one, else a shared SQLite file) and
/// prints both rows and the cluster figures, with nothing lost across the
/// node kill.
#[test]
fn nodes_runs_a_cluster_and_prints_its_figures() {
    let bench = bin_dir().join("roboger-bench");
    assert!(bench.exists(), "build it first: cargo build --workspace");
    let mut cmd = Command::new(&bench);
    cmd.args(["--nodes", "2", "--duration", "1", "--connections", "4"])
        .args(["--drain", "60", "--manage", "20"]);
    for (var, flag) in [
        ("ROBOGER_TEST_PG", "--pg"),
        ("ROBOGER_TEST_MYSQL", "--mysql"),
    ] {
        if let Ok(url) = std::env::var(var)
            && !url.is_empty()
        {
            cmd.args([flag, &url]);
        }
    }
    let out = cmd.output().expect("run roboger-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for name in ["roboger (Rust), 1 node", "roboger (Rust), 2 nodes"] {
        let cols = row_of(&stdout, name);
        let delivered: f64 = cols[1].parse().expect("delivered/s");
        assert!(delivered > 0.0, "{name} delivered nothing: {cols:?}");
        assert_eq!(cols[7], "0", "{name} lost events: {cols:?}");
    }
    for figure in [
        "propagation (change through node 1 until node 2 obeys",
        "over 200 changes; 0 not obeyed by node 2 when answered",
        "delivered by the others",
        "; 0 lost",
        "creating addresses 1 by 1 up to 20",
    ] {
        assert!(stdout.contains(figure), "no {figure:?} in:\n{stdout}");
    }
}
