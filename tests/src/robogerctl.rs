//! The real management client, `robogerctl` 2.0.14 from PyPI, unmodified,
//! run against a test server: `tests/run` installs it into a virtualenv
//! and passes its path in `ROBOGER_TEST_ROBOGERCTL`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{KEY, Server, Value};

/// Where robogerctl is; `None` (said on stderr) when it is not installed,
/// outside `tests/run`.
pub fn robogerctl_path() -> Option<PathBuf> {
    crate::installed("ROBOGER_TEST_ROBOGERCTL", "robogerctl")
}

/// robogerctl, set up to manage one server.
pub struct Ctl {
    bin: PathBuf,
    config: PathBuf,
}

impl Ctl {
    pub fn new(bin: PathBuf, s: &Server, dir: &Path) -> Ctl {
        let config = dir.join("robogerctl.yml");
        std::fs::write(&config, format!("uri: {}\nkey: {KEY}\n", s.base)).unwrap();
        Ctl { bin, config }
    }

    /// Runs robogerctl; returns (success, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(&self.bin)
            .arg("-F")
            .arg(&self.config)
            .args(args)
            .env_remove("ROBOGER_CONFIG")
            .env_remove("ROBOGER_MASTERKEY")
            .output()
            .expect("run robogerctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a command that must succeed and print exactly `OK`.
    pub fn ok(&self, args: &[&str]) {
        let (ok, out, err) = self.run(args);
        assert!(ok, "robogerctl {args:?} failed: {err}");
        assert_eq!(out.trim(), "OK", "robogerctl {args:?}: {out}");
    }

    /// Runs a command with `-o json` and parses what it prints.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let (ok, out, err) = self.run(&all);
        assert!(ok, "robogerctl {args:?} failed: {err}");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("robogerctl {args:?} printed non-JSON ({e}): {out}"))
    }
}
