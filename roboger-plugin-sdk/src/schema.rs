//! Checking a config against the JSON Schema a plugin publishes, with a
//! message that names the key (enabled by the `schema` feature).

use serde_json::Value;

use crate::PluginError;

/// A compiled JSON Schema for configs.
pub struct ConfigSchema(jsonschema::Validator);

impl ConfigSchema {
    /// Compiles `schema` (a plugin's own, so a bad one is a bug: it panics
    /// at start with the reason rather than accepting anything).
    pub fn new(schema: &Value) -> ConfigSchema {
        match jsonschema::validator_for(schema) {
            Ok(v) => ConfigSchema(v),
            Err(e) => panic!("the plugin's config schema is invalid: {e}"),
        }
    }

    /// Compiles a schema from its JSON text.
    pub fn parse(text: &str) -> ConfigSchema {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => ConfigSchema::new(&v),
            Err(e) => panic!("the plugin's config schema is not JSON: {e}"),
        }
    }

    /// Refuses a config the schema does not accept, naming the key.
    pub fn check(&self, config: &Value) -> Result<(), PluginError> {
        let errors: Vec<String> = self
            .0
            .iter_errors(config)
            .map(|e| {
                let path = e.instance_path.to_string();
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_name_the_key() {
        let s = ConfigSchema::new(&json!({
            "type": "object", "additionalProperties": false,
            "properties": {"rcpt": {"type": "string"}, "port": {"type": "integer"}}
        }));
        assert!(s.check(&json!({"rcpt": "a@b"})).is_ok());
        let e = s.check(&json!({"rcp": "a@b"})).unwrap_err().to_string();
        assert!(e.contains("rcp"), "{e}");
        let e = s.check(&json!({"port": "x"})).unwrap_err().to_string();
        assert!(e.starts_with("port"), "{e}");
    }
}
