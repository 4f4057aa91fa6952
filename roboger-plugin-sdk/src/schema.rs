//! Checking a config against the JSON Schema a plugin publishes, with a
//! message that names the key (enabled by the `schema` feature).
//!
//! A plugin compiles its schema when it is built, with `jsonschema`'s
//! `validator` attribute (the plugin depends on `jsonschema` itself, which
//! the attribute needs): the schema is checked against its meta-schema at
//! build time, so a bad one fails the build, and nothing is compiled at
//! run time. Compiling at run time kept the meta-schema's validator
//! (about 5 MiB) resident in every plugin.
//!
//! ```ignore
//! #[jsonschema::validator(path = "../../schema/plugins/webhook.schema.json")]
//! struct WebhookConfig;
//!
//! roboger_plugin_sdk::schema::check(WebhookConfig::iter_errors(&config))?;
//! ```

use crate::PluginError;

/// Refuses a config with the errors a validator found, naming each key;
/// `Ok` when there are none.
pub fn check<'i>(
    errors: impl IntoIterator<Item = jsonschema::ValidationError<'i>>,
) -> Result<(), PluginError> {
    let errors: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let path = e.instance_path().to_string();
            if path.is_empty() {
                e.to_string()
            } else {
                format!("{}: {e}", path.trim_start_matches('/').replace('/', "."))
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PluginError::Rejected(errors.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[jsonschema::validator(schema = r#"{
        "type": "object", "additionalProperties": false,
        "properties": {"rcpt": {"type": "string"}, "port": {"type": "integer"}}
    }"#)]
    struct Sample;

    #[test]
    fn messages_name_the_key() {
        assert!(check(Sample::iter_errors(&json!({"rcpt": "a@b"}))).is_ok());
        let e = check(Sample::iter_errors(&json!({"rcp": "a@b"})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rcp"), "{e}");
        let e = check(Sample::iter_errors(&json!({"port": "x"})))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("port"), "{e}");
    }
}
