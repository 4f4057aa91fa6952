//! The webhook plugin: sends each event to a URL as JSON, built from the
//! endpoint's `template` with every value JSON-encoded (a quote or a
//! newline in a message can never break or inject into the JSON).
//! A non-2xx answer is a failure, so the server retries the delivery.
//! The endpoint's `headers` are checked as HTTP headers when it is made,
//! and may replace the JSON `Content-Type` but not the request's framing.

use roboger_plugin_sdk::http::reqwest::header::{HeaderName, HeaderValue};
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

/// Replaces each `$field` of `template` with its JSON, which `value`
/// writes into the body being built; other `$` text is kept as it is.
/// Values are written in place: a large media is copied once, into the
/// body, rather than cloned and encoded apart first.
fn render(template: &str, value: impl Fn(&str, &mut Vec<u8>)) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.extend_from_slice(&rest.as_bytes()[..i]);
        let after = &rest[i + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..len];
        if FIELDS.contains(&name) {
            value(name, &mut out);
        } else {
            out.push(b'$');
            out.extend_from_slice(name.as_bytes());
        }
        rest = &after[len..];
    }
    out.extend_from_slice(rest.as_bytes());
    // Only whole UTF-8 strings and JSON went in.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Headers the request sets itself from its body and connection: an
/// endpoint's would break it (a `Content-Length` that is not the body's
/// leaves the target waiting for the rest until the request times out).
const FRAMING: [&str; 7] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

/// The endpoint's `headers`: each an HTTP header name and a one-line
/// value, none of [`FRAMING`], none twice (names compare without case);
/// else why not, final (the same config would be refused again).
fn headers(config: &Value) -> Result<Vec<(&str, &str)>, PluginError> {
    let Some(Value::Object(given)) = config.get("headers") else {
        return Ok(Vec::new());
    };
    let mut out: Vec<(&str, &str)> = Vec::with_capacity(given.len());
    for (k, v) in given {
        let refused = |why: &str| PluginError::rejected(format!("headers: {k:?} {why}"));
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| refused("is not an HTTP header name"))?;
        if FRAMING.contains(&name.as_str()) {
            return Err(refused(
                "is set by the request itself, from its body and connection",
            ));
        }
        let Some(v) = v.as_str() else {
            return Err(refused("must be text"));
        };
        HeaderValue::from_str(v)
            .map_err(|_| refused("must be one line of text, without control characters"))?;
        if out.iter().any(|(seen, _)| seen.eq_ignore_ascii_case(k)) {
            return Err(refused("is given twice"));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Writes event field `name` as JSON.
fn field(e: &Event, name: &str, out: &mut Vec<u8>) {
    let written = match name {
        "event_id" => serde_json::to_writer(&mut *out, &e.event_id),
        "addr" => serde_json::to_writer(&mut *out, &e.addr),
        "addr_id" => serde_json::to_writer(&mut *out, &e.addr_id),
        "msg" => serde_json::to_writer(&mut *out, &e.msg),
        "subject" => serde_json::to_writer(&mut *out, &e.subject),
        "formatted_subject" => serde_json::to_writer(&mut *out, &e.formatted_subject),
        "level" => serde_json::to_writer(&mut *out, &e.level),
        "level_name" => serde_json::to_writer(&mut *out, &e.level_name),
        "location" => serde_json::to_writer(&mut *out, &e.location),
        "tag" => serde_json::to_writer(&mut *out, &e.tag),
        "sender" => serde_json::to_writer(&mut *out, &e.sender),
        "media" => serde_json::to_writer(&mut *out, &e.media_encoded),
        _ => serde_json::to_writer(&mut *out, &Value::Null),
    };
    // Writing into a Vec cannot fail.
    debug_assert!(written.is_ok());
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
            config_schema: Some(include_str!("../../../schema/plugins/webhook.schema.json")),
            plugin_config_schema: None,
        }
    }

    async fn validate_config(&self, config: &Value, _host: &Host) -> Result<(), PluginError> {
        schema::check(ConfigSchema::iter_errors(config))?;
        roboger_plugin_sdk::http::check_config_url(config, "url")?;
        if let Some(t) = config.get("template").and_then(Value::as_str) {
            if config.get("method").and_then(Value::as_str) == Some("GET") {
                return Err(PluginError::rejected(
                    "template: a GET sends no body; use POST, PUT or PATCH to send one",
                ));
            }
            let sample = render(t, |name, out| {
                out.extend_from_slice(if name == "level" { b"20" } else { b"\"\"" });
            });
            serde_json::from_str::<Value>(&sample).map_err(|e| {
                PluginError::rejected(format!("template: not JSON once filled in: {e}"))
            })?;
        }
        headers(config)?;
        Ok(())
    }

    async fn send(&self, e: Event, host: &Host) -> Result<(), PluginError> {
        let url = e.config_str("url")?;
        let body = match e.config.get("template").and_then(Value::as_str) {
            Some(t) => render(t, |name, out| field(&e, name, out)),
            None => "null".to_string(),
        };
        let method = e
            .config
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("POST");
        let headers = headers(&e.config)?;
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
    fn headers_are_http_headers_the_request_does_not_set_itself() {
        let check = |h: Value| {
            let config = serde_json::json!({ "headers": h });
            headers(&config).map(|h| h.len()).map_err(|e| e.to_string())
        };
        let ok = check(
            serde_json::json!({"Host": "example.test", "Content-Type": "text/plain", "X-N": "é"}),
        );
        assert_eq!(ok, Ok(3));
        for (h, said) in [
            (
                serde_json::json!({"X-A": "a\r\nB: c"}),
                "\"X-A\" must be one line of text",
            ),
            (
                serde_json::json!({"Bad Name": "x"}),
                "\"Bad Name\" is not an HTTP header name",
            ),
            (
                serde_json::json!({"Content-Length": "5"}),
                "\"Content-Length\" is set by the request itself",
            ),
            (
                serde_json::json!({"transfer-encoding": "chunked"}),
                "\"transfer-encoding\" is set by the request itself",
            ),
            (
                serde_json::json!({"X-A": "1", "x-a": "2"}),
                "\"x-a\" is given twice",
            ),
        ] {
            let e = check(h.clone()).err().unwrap_or_default();
            assert!(e.contains(&format!("headers: {said}")), "{h}: {e}");
        }
    }

    #[test]
    fn values_are_json_encoded_and_placeholders_at_the_end_work() {
        let t = r#"{"m": $msg, "l": $level, "s": $sender, "x": "$price"}$level"#;
        let out = render(t, |n, out| {
            let v = match n {
                "msg" => Value::from("say \"hi\"\nand\\bye"),
                "level" => Value::from(40),
                _ => Value::Null,
            };
            serde_json::to_writer(out, &v).expect("JSON");
        });
        assert_eq!(
            out,
            r#"{"m": "say \"hi\"\nand\\bye", "l": 40, "s": null, "x": "$price"}40"#
        );
    }
}
