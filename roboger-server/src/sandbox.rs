//! Least privilege for plugin processes. The supervisor does not exec a
//! plugin directly: it runs `roboger-server sandbox-exec [limits] -- EXE
//! ARGS`, which confines itself and then execs the plugin in its place
//! (same pid, same pipes), so the confinement is in force before the
//! plugin's first instruction, with no unsafe `pre_exec` hook.
//!
//! What it sets: resource limits (address space, open files, no core
//! dumps, CPU time when configured), `no_new_privs`, and a Landlock
//! ruleset that leaves the whole filesystem readable and executable but
//! writable only below the plugin's data directory, `/dev/null` and the
//! paths its `sandbox.writable` names. Landlock is best effort: the
//! kernel's ABI is used, and the plugin's log says what was enforced.
//! `sandbox.connect-ports` is the exception: a plugin limited to some
//! TCP ports (Landlock's network rules, Linux 6.7) is not run on a kernel
//! that cannot hold it to them, since its operator asked for that limit
//! by name and the egress policy binds only plugins that enforce it.
//!
//! Invariant: every plugin process starts confined by its `sandbox`
//! settings; a plugin never runs a step of its own before that.

use std::ffi::OsString;
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, NetPort, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetError, RulesetStatus, path_beneath_rules,
};
use rustix::process::{Resource, Rlimit, setrlimit};

use crate::config::Sandbox;

/// The hidden subcommand that confines itself and execs a plugin.
pub const SUBCOMMAND: &str = "sandbox-exec";

/// A sandbox that could not be set up; the plugin is not run.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot set {0}: {1}")]
    Limit(&'static str, std::io::Error),
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    #[error("cannot limit its TCP connections to connect-ports: {0}")]
    ConnectPorts(String),
}

/// The arguments of [`SUBCOMMAND`] that confine a plugin by `s` and then
/// run `exe` with `args`.
pub fn command_line(s: &Sandbox, exe: &std::path::Path, args: &[String]) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec![
        SUBCOMMAND.into(),
        "--address-space".into(),
        s.address_space.to_string().into(),
        "--open-files".into(),
        s.open_files.to_string().into(),
    ];
    if let Some(cpu) = s.cpu_seconds {
        out.extend(["--cpu-seconds".into(), cpu.to_string().into()]);
    }
    if let Some(ports) = &s.connect_ports {
        out.push("--connect-only".into());
        for p in ports {
            out.extend(["--connect-port".into(), p.to_string().into()]);
        }
    }
    if s.landlock {
        out.push("--landlock".into());
        let paths = std::iter::once(&s.data_dir).chain(&s.writable);
        for w in paths.filter(|p| !p.as_os_str().is_empty()) {
            out.extend(["--writable".into(), w.clone().into_os_string()]);
        }
    }
    out.push("--".into());
    out.push(exe.as_os_str().to_owned());
    out.extend(args.iter().map(OsString::from));
    out
}

/// What [`enter`] confines the process with.
#[derive(Debug, Clone, clap::Args)]
pub struct Spec {
    /// RLIMIT_AS, in bytes.
    #[arg(long)]
    pub address_space: u64,
    /// RLIMIT_NOFILE.
    #[arg(long)]
    pub open_files: u64,
    /// RLIMIT_CPU, in seconds.
    #[arg(long)]
    pub cpu_seconds: Option<u64>,
    /// Make the filesystem read-only but for `writable` (Landlock).
    #[arg(long)]
    pub landlock: bool,
    /// Paths left writable.
    #[arg(long)]
    pub writable: Vec<PathBuf>,
    /// Allow TCP connections only to `connect_port` (Landlock).
    #[arg(long)]
    pub connect_only: bool,
    /// The TCP ports it may connect to, with `connect_only`.
    #[arg(long)]
    pub connect_port: Vec<u16>,
}

/// Confines the calling process (before it execs the plugin); returns a
/// line saying what was enforced, for the plugin's log.
pub fn enter(spec: &Spec) -> Result<String, SandboxError> {
    let limit = |what, resource, value: u64, maximum: u64| {
        let v = Rlimit {
            current: Some(value),
            maximum: Some(maximum),
        };
        setrlimit(resource, v).map_err(|e| SandboxError::Limit(what, e.into()))
    };
    limit(
        "the address space limit",
        Resource::As,
        spec.address_space,
        spec.address_space,
    )?;
    limit(
        "the open files limit",
        Resource::Nofile,
        spec.open_files,
        spec.open_files,
    )?;
    limit("the core dump limit", Resource::Core, 0, 0)?;
    if let Some(cpu) = spec.cpu_seconds {
        // The kernel sends SIGXCPU at the soft limit but SIGKILL at the
        // hard one, and checks the hard one first: equal, the plugin would
        // die of a SIGKILL that says nothing about why. A second more of
        // hard limit lets SIGXCPU end it and name the cause; a plugin that
        // catches SIGXCPU gets that second and then the SIGKILL.
        limit(
            "the CPU time limit",
            Resource::Cpu,
            cpu,
            cpu.saturating_add(1),
        )?;
    }
    rustix::thread::set_no_new_privs(true).map_err(|e| SandboxError::NoNewPrivs(e.into()))?;
    let mut said = format!(
        "sandbox: address space {} MiB, {} open files, no core dumps, {}no_new_privs",
        spec.address_space / (1024 * 1024),
        spec.open_files,
        match spec.cpu_seconds {
            Some(s) => format!("{s} s of CPU, "),
            None => String::new(),
        }
    );
    if spec.connect_only {
        said.push_str(&connect_only(&spec.connect_port)?);
    }
    if !spec.landlock {
        said.push_str("; Landlock off by its settings");
        return Ok(said);
    }
    let abi = ABI::V6;
    let dev_null = PathBuf::from("/dev/null");
    let writable: Vec<&PathBuf> = spec
        .writable
        .iter()
        .chain(std::iter::once(&dev_null))
        .filter(|p| p.exists())
        .collect();
    let restricted = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(&writable, AccessFs::from_all(abi))))
        .and_then(|r| r.restrict_self());
    let status = match restricted {
        Ok(s) => s,
        // Best effort: e.g. a seccomp filter refusing the Landlock calls.
        Err(e) => {
            said.push_str(&format!("; Landlock NOT enforced: {e}"));
            return Ok(said);
        }
    };
    let shown: Vec<String> = writable.iter().map(|p| p.display().to_string()).collect();
    said.push_str(&match status.ruleset {
        RulesetStatus::FullyEnforced => format!(
            "; Landlock enforced: the filesystem is read-only but for {}",
            shown.join(", ")
        ),
        RulesetStatus::PartiallyEnforced => format!(
            "; Landlock partly enforced (this kernel's ABI lacks some rights): read-only but for {}",
            shown.join(", ")
        ),
        RulesetStatus::NotEnforced => {
            "; Landlock NOT enforced: this kernel does not support it".to_string()
        }
    });
    Ok(said)
}

/// Holds the process to TCP connections to `ports` (none: no TCP
/// connection at all), or fails: unlike the filesystem rules, this limit
/// is never left out quietly.
fn connect_only(ports: &[u16]) -> Result<String, SandboxError> {
    let failed = |e: &dyn std::fmt::Display| SandboxError::ConnectPorts(e.to_string());
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessNet::ConnectTcp)
        .and_then(|r| r.create())
        .and_then(|r| {
            r.add_rules(
                ports
                    .iter()
                    .map(|&p| Ok::<_, RulesetError>(NetPort::new(p, AccessNet::ConnectTcp))),
            )
        })
        .and_then(|r| r.restrict_self())
        .map_err(|e| failed(&e))?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(failed(
            &"this kernel does not enforce Landlock's network rules",
        ));
    }
    let shown: Vec<String> = ports.iter().map(u16::to_string).collect();
    Ok(if shown.is_empty() {
        "; no TCP connections".to_string()
    } else {
        format!("; TCP connections to port {} only", shown.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_carries_every_setting() {
        let s = Sandbox {
            cpu_seconds: Some(5),
            data_dir: "/var/lib/roboger/plugins/x".into(),
            writable: vec!["/srv/out".into()],
            connect_ports: Some(vec![443, 587]),
            ..Sandbox::default()
        };
        let line: Vec<String> = command_line(&s, "/usr/lib/roboger/p".as_ref(), &["m".into()])
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let text = line.join(" ");
        assert!(text.starts_with("sandbox-exec --address-space 4294967296 --open-files 1024"));
        assert!(text.contains(
            "--cpu-seconds 5 --connect-only --connect-port 443 --connect-port 587 --landlock"
        ));
        assert!(text.contains("--writable /var/lib/roboger/plugins/x --writable /srv/out"));
        assert!(text.ends_with("-- /usr/lib/roboger/p m"));
    }
}
