//! The webhook plugin: sends each event to a URL as JSON, built from the
//! endpoint's `template` with every value JSON-encoded (a quote or a
//! newline in a message can never break or inject into the JSON).
//! A non-2xx answer is a failure, so the server retries the delivery.

use roboger_plugin_sdk::schema;
use roboger_plugin_sdk::{Event, Host, Info, Plugin, PluginError, run};
use serde_json::Value;

/// The endpoint config's schema, compiled when the plugin is built.
#[jsonschema::validator(path = "../../schema/plugins/webhook.schema.json")]
struct ConfigSchema;

const FIELDS: [&str; 12] = [
    "event_id",
    "addr",
    "addr_id",
    "msg",
    "subject",
    "formatted_subject",
    "level",
    "level_name",
    "location",
    "tag",
    "sender",
    "media",
];

struct Webhook;

/// Replaces each `$field` of `template` with `value(field)`; other `$`
/// text is kept as it is.
fn render(template: &str, value: impl Fn(&str) -> Value) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..len];
        if FIELDS.contains(&name) {
            out.push_str(&value(name).to_string());
        } else {
            out.push('$');
            out.push_str(name);
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

fn field(e: &Event, name: &str) -> Value {
    let opt = |v: &Option<String>| v.clone().map(Value::from).unwrap_or(Value::Null);
    match name {
        "event_id" => e.event_id.clone().into(),
        "addr" => e.addr.clone().into(),
        "addr_id" => e.addr_id.into(),
        "msg" => e.msg.clone().into(),
        "subject" => e.subject.clone().into(),
        "formatted_subject" => e.formatted_subject.clone().into(),
        "level" => e.level.into(),
        "level_name" => e.level_name.clone().into(),
        "location" => opt(&e.location),
        "tag" => opt(&e.tag),
        "sender" => opt(&e.sender),
        "media" => opt(&e.media_encoded),
        _ => Value::Null,
    }
}

#[roboger_plugin_sdk::async_trait]
impl Plugin for Webhook {
    fn info(&self) -> Info {
        Info {
            name: "webhook",
            version: env!("CARGO_PKG_VERSION"),
            description: "sends event via custom webhook",
            url: None,
            http: false,
        }
    }

    async fn validate_config(&self, config: &Value, _host: &Host) -> Result<(), PluginError> {
        schema::check(ConfigSchema::iter_errors(config))?;
        roboger_plugin_sdk::http::check_config_url(config, "url")?;
        if let Some(t) = config.get("template").and_then(Value::as_str) {
            let sample = render(t, |name| {
                if name == "level" {
                    Value::from(20)
                } else {
                    Value::from("")
                }
            });
            serde_json::from_str::<Value>(&sample).map_err(|e| {
                PluginError::rejected(format!("template: not JSON once filled in: {e}"))
            })?;
        }
        Ok(())
    }

    async fn send(&self, e: Event, host: &Host) -> Result<(), PluginError> {
        let url = e.config_str("url")?;
        let body = match e.config.get("template").and_then(Value::as_str) {
            Some(t) => render(t, |name| field(&e, name)),
            None => "null".to_string(),
        };
        let method = e
            .config
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("POST");
        let headers: Vec<(&str, &str)> = match e.config.get("headers") {
            Some(Value::Object(h)) => h
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                .collect(),
            _ => Vec::new(),
        };
        roboger_plugin_sdk::http::send_json(host, method, url, &headers, body).await?;
        tracing::debug!(event = %e.event_id, %url, "delivered");
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    run(Webhook)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_json_encoded_and_placeholders_at_the_end_work() {
        let t = r#"{"m": $msg, "l": $level, "s": $sender, "x": "$price"}$level"#;
        let out = render(t, |n| match n {
            "msg" => Value::from("say \"hi\"\nand\\bye"),
            "level" => Value::from(40),
            _ => Value::Null,
        });
        assert_eq!(
            out,
            r#"{"m": "say \"hi\"\nand\\bye", "l": 40, "s": null, "x": "$price"}40"#
        );
    }
}
