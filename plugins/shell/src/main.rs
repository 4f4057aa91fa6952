//! The shell plugin: runs the endpoint's `command` (with `sh -c`) for each
//! event. The event's fields reach the command only as environment
//! variables (`ROBOGER_MSG`, …), never spliced into the command text, so
//! a message full of shell metacharacters stays data; a command written
//! for the original, which spliced `$msg` into its text, finds `$msg` set
//! (see [`environment`]), inside single quotes too ([`placeholder`]). The
//! command has
//! nine tenths of the server's timeout (`Host::call_budget`), after which
//! it is killed with everything it started (its process group); its
//! output goes to the log, within bounds ([`output`]); a non-zero exit is
//! a failed delivery (retried). What it leaves running in the background
//! when it exits is not waited for.

mod output;
mod placeholder;

use std::process::Stdio;
use std::time::Duration;

use roboger_plugin_sdk::schema;
use roboger_plugin_sdk::{Event, Host, Info, Plugin, PluginError, run};
use rustix::process::{Pid, Signal};
use serde_json::Value;

use output::Output;

/// How long a command's output is still read once it has exited: a
/// process it started in the background may hold the output open.
const AFTER_EXIT: Duration = Duration::from_millis(200);

/// The endpoint config's schema, compiled when the plugin is built.
#[jsonschema::validator(path = "../../schema/plugins/shell.schema.json")]
struct ConfigSchema;

struct Shell;

/// The environment a command gets for `e` (the media goes in a file):
/// each field as `ROBOGER_{NAME}`, and those the original's commands
/// named also under its placeholder's name (`msg`, `level_name`, ...).
/// The original spliced `$msg` into the command's text; here the shell
/// expands the variable, so such a command gets the same value, as data.
fn environment(e: &Event) -> Vec<(String, String)> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let fields = [
        ("event_id", e.event_id.clone()),
        ("addr", e.addr.clone()),
        ("msg", e.msg.clone()),
        ("subject", e.subject.clone()),
        ("formatted_subject", e.formatted_subject.clone()),
        ("level", e.level.to_string()),
        ("level_name", e.level_name.clone()),
        ("location", opt(&e.location)),
        ("tag", opt(&e.tag)),
        ("sender", opt(&e.sender)),
    ];
    let mut env = vec![
        ("ROBOGER_ADDR_ID".to_string(), e.addr_id.to_string()),
        ("ROBOGER_MEDIA_FNAME".to_string(), opt(&e.media_fname)),
    ];
    for (name, value) in fields {
        env.push((format!("ROBOGER_{}", name.to_uppercase()), value.clone()));
        env.push((name.to_string(), value));
    }
    env
}

#[roboger_plugin_sdk::async_trait]
impl Plugin for Shell {
    fn info(&self) -> Info {
        Info {
            name: "shell",
            version: env!("CARGO_PKG_VERSION"),
            description: "runs a command for each event",
            url: None,
            http: false,
            config_schema: Some(include_str!("../../../schema/plugins/shell.schema.json")),
            plugin_config_schema: None,
        }
    }

    async fn validate_config(&self, config: &Value, _host: &Host) -> Result<(), PluginError> {
        schema::check(ConfigSchema::iter_errors(config))
    }

    async fn send(&self, e: Event, host: &Host) -> Result<(), PluginError> {
        let command = e.config_str("command")?;
        let media = match &e.media {
            Some(bytes) => {
                let f = tempfile::NamedTempFile::new().map_err(PluginError::failed)?;
                tokio::fs::write(f.path(), bytes)
                    .await
                    .map_err(PluginError::failed)?;
                Some(f)
            }
            None => None,
        };
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(placeholder::expand_in_single_quotes(command).as_ref())
            .envs(environment(&e))
            .env(
                "ROBOGER_MEDIA_FILE",
                media
                    .as_ref()
                    .map(|f| f.path().display().to_string())
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a command that outlasts its
            // time is killed with everything it started.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|err| PluginError::failed(format!("cannot run sh: {err}")))?;
        let group = child
            .id()
            .and_then(|id| Pid::from_raw(i32::try_from(id).ok()?));
        let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
        let (mut stdout, mut stderr) = (Output::default(), Output::default());
        // A little under the server's own call timeout, so the command is
        // killed here (and its output logged) before the call gives up.
        let timeout = host.call_budget().await.as_secs_f64();
        let run = async {
            let mut read = std::pin::pin!(async {
                tokio::join!(
                    stdout.read_from(out.as_mut()),
                    stderr.read_from(err.as_mut())
                )
            });
            let mut read_all = false;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    _ = &mut read, if !read_all => read_all = true,
                }
            };
            // What it left running in the background may hold its output
            // open; it is not waited for.
            if !read_all {
                let _ = tokio::time::timeout(AFTER_EXIT, read).await;
            }
            status
        };
        let status = tokio::time::timeout(Duration::from_secs_f64(timeout), run).await;
        if status.is_err()
            && let Some(group) = group
        {
            let _ = rustix::process::kill_process_group(group, Signal::KILL);
        }
        for line in stdout
            .log_lines("stdout")
            .into_iter()
            .chain(stderr.log_lines("stderr"))
        {
            tracing::info!(event = %e.event_id, "command: {line}");
        }
        let status = status
            .map_err(|_| {
                PluginError::failed(format!(
                    "the command did not finish within {timeout} s; killed"
                ))
            })?
            .map_err(PluginError::failed)?;
        drop(media);
        if status.success() {
            Ok(())
        } else {
            Err(PluginError::failed(format!(
                "the command failed ({status}): {}",
                stderr.end()
            )))
        }
    }
}

fn main() -> std::process::ExitCode {
    run(Shell)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every placeholder the rewrite expands is set, so a single-quoted
    /// `'$tag'` can never expand to an unset variable.
    #[test]
    fn every_placeholder_is_in_the_environment() {
        let env = environment(&Event::default());
        for name in placeholder::NAMES {
            assert!(env.iter().any(|(k, _)| k == name), "{name} is not set");
        }
    }
}
