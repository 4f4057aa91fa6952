//! The slack plugin: posts each event to a Slack incoming webhook, as
//! plain text (formatted subject, newline, message) or, with `rich`, as an
//! attachment coloured by level; the sender, when given, is the username.
//! The event's text is escaped as Slack asks (`&`, `<`, `>`), so a
//! message is shown as sent and cannot mention `<!channel>` or disguise
//! a link; Slack's answers that say the webhook will never take the
//! message (400, 403, 404, 410) fail the delivery at once.

use roboger_plugin_sdk::markup::escape;
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
    // Shown as sent: unescaped, `<!channel>` in a log line would notify
    // the whole channel and `<https://x|y>` would show a link as other text.
    let (subject, msg) = (escape(&e.formatted_subject), escape(&e.msg));
    let mut body = if rich {
        json!({
            "text": "",
            "attachments": [{
                "fallback": subject,
                "color": colour(e.level),
                "fields": [{"title": subject, "value": msg, "short": false}],
            }],
        })
    } else if msg.is_empty() {
        json!({"text": subject})
    } else {
        json!({"text": format!("{subject}\n{msg}")})
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
        let body = payload(&e, rich).to_string();
        roboger_plugin_sdk::http::send_json_with_final(host, "POST", url, &[], body, &FINAL).await
    }
}

/// Slack's answers that say this webhook will never take the message, so
/// the delivery fails at once, with Slack's reason (quoted from its
/// answer) in the error: 400 (`invalid_payload`, `no_text`), 403
/// (`action_prohibited`, `invalid_token`), 404 (`no_service`: the
/// webhook was removed; `channel_not_found`) and 410
/// (`channel_is_archived`). Any other answer (429 with `Retry-After`,
/// 5xx) is tried again. Once the webhook is mended, the endpoint's
/// `retry` command tries its failed deliveries again.
const FINAL: [roboger_plugin_sdk::http::reqwest::StatusCode; 4] = {
    use roboger_plugin_sdk::http::reqwest::StatusCode;
    [
        StatusCode::BAD_REQUEST,
        StatusCode::FORBIDDEN,
        StatusCode::NOT_FOUND,
        StatusCode::GONE,
    ]
};

fn main() -> std::process::ExitCode {
    run(Slack)
}
