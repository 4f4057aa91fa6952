//! The chain plugin: forwards each event to another Roboger server's
//! `/push`, to the endpoint's `addr`; the other server's non-202 answer
//! is a failed delivery, retried (a 4xx there will not heal by itself,
//! but retries stop at the pipeline's max-attempts). Each push says how
//! many servers have forwarded the event, one more than the event's own
//! `hops`, so a loop of chain endpoints ends at the server that finds it
//! has gone round too often: its 409 (which `/push` answers for nothing
//! else) fails the delivery for good, as trying again would be refused
//! again.

use roboger_plugin_sdk::protocol::HOPS_HEADER;
use roboger_plugin_sdk::schema;
use roboger_plugin_sdk::{Event, Host, Info, Plugin, PluginError, run};
use serde_json::{Value, json};

/// The endpoint config's schema, compiled when the plugin is built.
#[jsonschema::validator(path = "../../schema/plugins/chain.schema.json")]
struct ConfigSchema;

struct Chain;

/// The push for the other server: the event's own fields, its addr.
fn push(e: &Event, addr: &str) -> Value {
    json!({
        "addr": addr,
        "msg": e.msg,
        "subject": e.subject,
        "level": e.level,
        "location": e.location,
        "tag": e.tag,
        "sender": e.sender,
        "media": e.media_encoded,
        "media_fname": e.media_fname,
    })
}

#[roboger_plugin_sdk::async_trait]
impl Plugin for Chain {
    fn info(&self) -> Info {
        Info {
            name: "chain",
            version: env!("CARGO_PKG_VERSION"),
            description: "chain-send event to another Roboger server",
            url: None,
            http: false,
            config_schema: Some(include_str!("../../../schema/plugins/chain.schema.json")),
            plugin_config_schema: None,
        }
    }

    async fn validate_config(&self, config: &Value, _host: &Host) -> Result<(), PluginError> {
        schema::check(ConfigSchema::iter_errors(config))?;
        roboger_plugin_sdk::http::check_config_url(config, "url")?;
        Ok(())
    }

    async fn send(&self, e: Event, host: &Host) -> Result<(), PluginError> {
        let (url, addr) = (e.config_str("url")?, e.config_str("addr")?);
        let url = format!("{}/push", url.trim_end_matches('/'));
        let hops = (u32::from(e.hops) + 1).to_string();
        let headers = [(HOPS_HEADER, hops.as_str())];
        let body = push(&e, addr).to_string();
        roboger_plugin_sdk::http::send_json_with_final(host, "POST", &url, &headers, body, &FINAL)
            .await
    }
}

/// The other server's answers that say this event will never be taken
/// there, so the delivery fails at once: 400, a field it cannot take (its
/// database cannot store the text, say); 409, forwarded round a loop of
/// chain endpoints; 413, larger than its `push-max-media`. Any other
/// answer (404 or 406 for an address not there or disabled, 429 over its
/// limit, 503) may change, and is tried again.
const FINAL: [roboger_plugin_sdk::http::reqwest::StatusCode; 3] = {
    use roboger_plugin_sdk::http::reqwest::StatusCode;
    [
        StatusCode::BAD_REQUEST,
        StatusCode::CONFLICT,
        StatusCode::PAYLOAD_TOO_LARGE,
    ]
};

fn main() -> std::process::ExitCode {
    run(Chain)
}
