//! Least privilege for plugin processes. The supervisor does not exec a
//! plugin directly: it runs `roboger-server sandbox-exec [limits] -- EXE
//! ARGS`, which confines itself and then execs the plugin in its place
//! (same pid, same pipes), so the confinement is in force before the
//! plugin's first instruction, with no unsafe `pre_exec` hook.
//!
//! What it sets: resource limits (address space, open files, no core
//! dumps, CPU time when configured), `no_new_privs`, and a Landlock
//! ruleset that leaves the filesystem readable and executable but
//! writable only below the plugin's data directory, `/dev/null` and the
//! paths its `sandbox.writable` names, and leaves the server's own files
//! (`Sandbox::hidden`: its configuration, the files its secrets were read
//! from, its data directory, its SQLite database) unreadable. Landlock is best effort: the
//! kernel's ABI is used, and the plugin's log says what was enforced.
//! `sandbox.connect-ports` is the exception: a plugin limited to some
//! TCP ports (Landlock's network rules, Linux 6.7) is not run on a kernel
//! that cannot hold it to them, since its operator asked for that limit
//! by name and the egress policy binds only plugins that enforce it.
//!
//! Invariant: every plugin process starts confined by its `sandbox`
//! settings; a plugin never runs a step of its own before that. Where
//! Landlock is enforced, no plugin reads the server's own files outside
//! [`UNSPLIT`] but through its `writable` paths. A plugin holds no
//! capability, even where the server runs as root.

use std::ffi::OsString;
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, NetPort, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, path_beneath_rules,
};
use rustix::process::{Resource, Rlimit, setrlimit};

use crate::config::{Config, Sandbox};

/// The hidden subcommand that confines itself and execs a plugin.
pub const SUBCOMMAND: &str = "sandbox-exec";

/// A sandbox that could not be set up; the plugin is not run.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot set {0}: {1}")]
    Limit(&'static str, std::io::Error),
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    #[error("cannot drop its capabilities: {0}")]
    Capabilities(std::io::Error),
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
        for h in &s.hidden {
            out.extend(["--hidden".into(), h.clone().into_os_string()]);
        }
        // Its executable runs even from below a hidden path.
        if exe.is_absolute() && s.hidden.iter().any(|h| exe.starts_with(h)) {
            out.extend(["--readable".into(), exe.as_os_str().to_owned()]);
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
    /// Paths it cannot read (the server's own files), unless writable.
    #[arg(long)]
    pub hidden: Vec<PathBuf>,
    /// Paths it may read and run even below a hidden one.
    #[arg(long)]
    pub readable: Vec<PathBuf>,
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
    drop_capabilities().map_err(SandboxError::Capabilities)?;
    rustix::thread::set_no_new_privs(true).map_err(|e| SandboxError::NoNewPrivs(e.into()))?;
    let mut said = format!(
        "sandbox: address space {} MiB, {} open files, no core dumps, {}no capabilities, \
         no_new_privs",
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
    let (hidden, below_etc): (Vec<PathBuf>, Vec<PathBuf>) = spec
        .hidden
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .partition(|p| !p.starts_with(UNSPLIT));
    let mut readable = readable_around(&hidden);
    readable.extend(spec.readable.iter().cloned());
    let restricted = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|mut r| {
            // Each readable path is granted on its own, and one Landlock
            // refuses is left out rather than the whole ruleset: a
            // directory split around a hidden path may hold entries on a
            // pseudo filesystem (`/dev/stdin`, a link to a pipe), which
            // it refuses. Paths that cannot be opened (a dangling link)
            // are left out as well.
            for rule in path_beneath_rules(readable, AccessFs::from_read(abi)).flatten() {
                let _ = (&mut r).add_rule(rule);
            }
            r.add_rules(path_beneath_rules(&writable, AccessFs::from_all(abi)))
        })
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
    let mut unreadable = String::new();
    if !hidden.is_empty() {
        let h: Vec<String> = hidden.iter().map(|p| p.display().to_string()).collect();
        unreadable = format!(
            "; the server's own files are not readable: {}",
            h.join(", ")
        );
    }
    unreadable.push_str(&left_readable(&below_etc));
    unreadable.push_str(&scope_signals());
    said.push_str(&match status.ruleset {
        RulesetStatus::FullyEnforced => format!(
            "; Landlock enforced: the filesystem is read-only but for {}{unreadable}",
            shown.join(", ")
        ),
        RulesetStatus::PartiallyEnforced => format!(
            "; Landlock partly enforced (this kernel's ABI lacks some rights): read-only but \
             for {}{unreadable}",
            shown.join(", ")
        ),
        RulesetStatus::NotEnforced => {
            "; Landlock NOT enforced: this kernel does not support it".to_string()
        }
    });
    Ok(said)
}

/// Leaves the process no capability: its ambient, inheritable, permitted
/// and effective sets are emptied, and with `no_new_privs` (set next)
/// an exec cannot give root's back. A server run as root (by hand, in a
/// container) would otherwise give each plugin root's capabilities, and
/// `CAP_SYS_PTRACE` takes a process past Landlock's rule on other
/// processes: such a plugin read the server's `/proc/PID/environ`.
fn drop_capabilities() -> std::io::Result<()> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    match rustix::thread::clear_ambient_capability_set() {
        // Before Linux 4.3, there is no ambient set.
        Ok(()) | Err(rustix::io::Errno::INVAL) => {}
        Err(e) => return Err(e.into()),
    }
    let none = CapabilitySet::empty();
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: none,
            permitted: none,
            inheritable: none,
        },
    )?;
    Ok(())
}

/// Keeps the process's signals to the processes it starts (Landlock's
/// scope, Linux 6.12): a plugin runs as the server's user, and could
/// otherwise stop the server or another plugin. Best effort, as the rest
/// of Landlock is; returns the log's words for what holds.
fn scope_signals() -> String {
    let scoped = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .scope(Scope::Signal)
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self());
    match scoped {
        Ok(s) if s.ruleset == RulesetStatus::FullyEnforced => {
            "; signals reach only its own processes".to_string()
        }
        Ok(_) | Err(_) => {
            "; its signals are not scoped (this kernel's Landlock cannot: Linux 6.12)".to_string()
        }
    }
}

/// The directory whose entries are never granted one by one, so a
/// hidden path below it stays readable: the C library reads its files
/// again while a plugin runs (`resolv.conf`, `hosts`, `localtime`), and
/// they are replaced by renaming (a DHCP client, an editor), which a
/// rule on the old file does not follow. A configuration there is best
/// kept free of secrets: the database URL and the master key can be read
/// from files in the data directory instead.
const UNSPLIT: &str = "/etc";

/// One line for the log for each of the server's secrets that its
/// plugins can read though Landlock confines them: those written in a
/// file below [`UNSPLIT`] (a master key in `/etc/roboger/roboger.yml`, a
/// key file beside it), saying where to give it instead. None when no
/// plugin runs under Landlock (each one's log says so).
pub fn unhidden_secrets(c: &Config) -> Vec<String> {
    if !c.plugins.iter().any(|p| p.sandbox.landlock) {
        return Vec::new();
    }
    c.secrets
        .iter()
        .filter(|s| {
            std::fs::canonicalize(&s.file)
                .unwrap_or_else(|_| s.file.clone())
                .starts_with(UNSPLIT)
        })
        .map(|s| {
            format!(
                "{} is readable to every plugin: it is in {}, and Landlock cannot hide files \
                 below {UNSPLIT} from them; give its value in {}, or in a file outside \
                 {UNSPLIT} (see \"Plugin security\" in the README)",
                s.what,
                s.file.display(),
                s.variable
            )
        })
        .collect()
}

/// The log's words for the server's files left readable below
/// [`UNSPLIT`].
fn left_readable(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return String::new();
    }
    let p: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    format!(
        "; readable still, below {UNSPLIT}, whose files cannot be hidden one by one: {}",
        p.join(", ")
    )
}

/// What to leave readable so that `hidden` (absolute, canonical paths)
/// is not: `/` when nothing is hidden; else, in each directory that holds
/// a hidden path, every entry but the hidden one and those leading to
/// one (which are split in turn). Landlock grants rights below a path and
/// cannot take them back below it, so a hidden path's siblings are
/// granted one by one. An entry made after the plugin started in such a
/// directory is not readable either (a SQLite journal next to the
/// database is among them), nor can such a directory be listed.
fn readable_around(hidden: &[PathBuf]) -> Vec<PathBuf> {
    use std::collections::BTreeSet;
    if hidden.is_empty() {
        return vec![PathBuf::from("/")];
    }
    let hidden: BTreeSet<&std::path::Path> = hidden.iter().map(PathBuf::as_path).collect();
    // The directories to split: the ancestors of the hidden paths, less
    // those hidden whole.
    let split: BTreeSet<&std::path::Path> = hidden
        .iter()
        .flat_map(|h| h.ancestors().skip(1))
        .filter(|d| !d.ancestors().any(|a| hidden.contains(a)))
        .collect();
    let mut out = Vec::new();
    for dir in &split {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !hidden.contains(p.as_path()) && !split.contains(p.as_path()) {
                out.push(p);
            }
        }
    }
    out
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

    #[test]
    fn hidden_paths_travel_and_a_plugin_below_one_still_runs() {
        let s = Sandbox {
            hidden: vec!["/etc/roboger/roboger.yml".into(), "/var/lib/roboger".into()],
            ..Sandbox::default()
        };
        let text = |exe: &str| {
            command_line(&s, exe.as_ref(), &[])
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let elsewhere = text("/usr/lib/roboger/p");
        assert!(
            elsewhere.contains("--hidden /etc/roboger/roboger.yml --hidden /var/lib/roboger --"),
            "{elsewhere}"
        );
        assert!(!elsewhere.contains("--readable"), "{elsewhere}");
        assert!(text("/var/lib/roboger/bin/p").contains("--readable /var/lib/roboger/bin/p --"));
    }

    #[test]
    fn around_hidden_paths_their_siblings_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for d in ["etc/app", "etc/ssl", "var/data/plugins/p", "usr"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in ["etc/app/app.yml", "etc/app/modules.py", "etc/hosts"] {
            std::fs::write(root.join(f), "").unwrap();
        }
        let hidden = [root.join("etc/app/app.yml"), root.join("var/data")];
        let mut readable: Vec<String> = readable_around(&hidden)
            .iter()
            .filter_map(|p| p.strip_prefix(&root).ok())
            .map(|p| p.display().to_string())
            .collect();
        readable.sort();
        assert_eq!(
            readable,
            ["etc/app/modules.py", "etc/hosts", "etc/ssl", "usr"]
        );
        assert_eq!(readable_around(&[]), [PathBuf::from("/")]);
    }
}
