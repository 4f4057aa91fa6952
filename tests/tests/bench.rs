//! The benchmark still runs end to end: a short run of `roboger-bench`
//! against our server (webhook plugin, sink, plugin SIGKILL) finishes
//! with every accepted event delivered. It checks no timing; the figures
//! are for BENCHMARKS.md, made with a release build.

use std::process::Command;

use roboger_tests::bin_dir;

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
    let row = stdout
        .lines()
        .find(|l| l.starts_with("roboger (Rust)"))
        .unwrap_or_else(|| panic!("no result row:\n{stdout}"));
    // accepted/s and delivered/s are the first two numbers; lost is the 8th.
    let cols: Vec<&str> = row["roboger (Rust)".len()..].split_whitespace().collect();
    let accepted: f64 = cols[0].parse().expect("accepted/s");
    assert!(accepted > 0.0, "nothing was accepted: {row}");
    assert_eq!(cols[7], "0", "events lost: {row}");
    // The last column is the hypervisor's steal during the load, in %.
    let steal: f64 = cols.last().and_then(|c| c.parse().ok()).expect("steal%");
    assert!((0.0..=100.0).contains(&steal), "steal% out of range: {row}");
    assert!(
        stdout.contains("0 accepted events lost"),
        "the plugin kill lost events or was not measured:\n{stdout}"
    );
}
