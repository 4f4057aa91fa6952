//! `roboger-plugin-python MODULE`: hosts a seed-style Python plugin module
//! (`robogercontrib.NAME`, written for the original Roboger) as an
//! out-of-process plugin. The bridge itself is Python (`bridge.py`,
//! embedded here so the executable is all there is to install): this
//! program replaces itself with `python3 -c BRIDGE MODULE`, so the
//! interpreter inherits the pipes, the process group and the environment
//! (`PYTHONPATH` finds the module). `ROBOGER_PYTHON` names another
//! interpreter.

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

const BRIDGE: &str = include_str!("bridge.py");

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [module] = args.as_slice() else {
        eprintln!("ERROR usage: roboger-plugin-python MODULE (e.g. robogercontrib.foo)");
        return ExitCode::from(2);
    };
    let python = std::env::var("ROBOGER_PYTHON").unwrap_or_else(|_| "python3".into());
    let err = Command::new(&python)
        .arg("-c")
        .arg(BRIDGE)
        .arg(module)
        .env("PYTHONUNBUFFERED", "1")
        .exec();
    eprintln!("ERROR cannot run {python}: {err}");
    ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    /// The bridge refuses by default exactly what the SDK's HTTP client
    /// refuses, and gives the same reasons: it keeps its own copy of the
    /// list (it is Python, standard library only).
    #[test]
    fn the_bridge_denies_by_default_what_the_sdk_denies() {
        let sdk = roboger_plugin_sdk::egress::DEFAULT_DENY;
        for (net, why) in sdk {
            let entry = format!("(\"{net}\", \"{why}\")");
            assert!(super::BRIDGE.contains(&entry), "bridge.py lacks {entry}");
        }
        let list = super::BRIDGE
            .split_once("DEFAULT_DENY = (")
            .and_then(|(_, rest)| rest.split_once("\n)"))
            .map(|(list, _)| list)
            .expect("bridge.py has DEFAULT_DENY");
        assert_eq!(list.matches("(\"").count(), sdk.len(), "{list}");
    }
}
