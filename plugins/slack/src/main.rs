//! The slack plugin: posts each event to a Slack incoming webhook, as
//! plain text (formatted subject, newline, message) or, with `rich`, as an
//! attachment coloured by level; the sender, when given, is the username.

use roboger_plugin_sdk::schema;
use roboger_plugin_sdk::{Event, Host, Info, Plugin, PluginError, run};
use serde_json::{Value, json};

/// The endpoint config's schema, compiled when the plugin is built.
#[jsonschema::validator(path = "../../schema/plugins/slack.schema.json")]
struct ConfigSchema;

struct Slack;

/// The attachment colour of a level, as in the original.
fn colour(level: u8) -> &'static str {
    match level {
        10 => "#555555",
        20 => "good",
        30 => "warning",
        40 => "danger",
        _ => "#FF2222",
    }
}

/// The Slack message for an event.
fn payload(e: &Event, rich: bool) -> Value {
    let mut body = if rich {
        json!({
            "text": "",
            "attachments": [{
                "fallback": e.formatted_subject,
                "color": colour(e.level),
                "fields": [{"title": e.formatted_subject, "value": e.msg, "short": false}],
            }],
        })
    } else if e.msg.is_empty() {
        json!({"text": e.formatted_subject})
    } else {
        json!({"text": format!("{}\n{}", e.formatted_subject, e.msg)})
    };
    if let Some(sender) = e.sender.as_deref().filter(|s| !s.is_empty()) {
        body["username"] = sender.into();
    }
    body
}

#[roboger_plugin_sdk::async_trait]
impl Plugin for Slack {
    fn info(&self) -> Info {
        Info {
            name: "slack",
            version: env!("CARGO_PKG_VERSION"),
            description: "sends event to Slack webhook",
            url: None,
            http: false,
            config_schema: Some(include_str!("../../../schema/plugins/slack.schema.json")),
            plugin_config_schema: None,
        }
    }

    async fn validate_config(&self, config: &Value, _host: &Host) -> Result<(), PluginError> {
        schema::check(ConfigSchema::iter_errors(config))?;
        roboger_plugin_sdk::http::check_config_url(config, "url")?;
        Ok(())
    }

    async fn send(&self, e: Event, host: &Host) -> Result<(), PluginError> {
        let url = e.config_str("url")?;
        let rich = e
            .config
            .get("rich")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        roboger_plugin_sdk::http::send_json(host, "POST", url, &[], payload(&e, rich).to_string())
            .await
    }
}

fn main() -> std::process::ExitCode {
    run(Slack)
}
