//! An endpoint's config as an HTML form, built from the JSON Schema the
//! plugin announced in its handshake, and the submitted form made back
//! into the config JSON the management API takes.
//!
//! Each property of the schema is one field: an `enum` is a select, a
//! string an input (a password input when `writeOnly`, left blank to keep
//! the stored secret), a number or integer a number input, a boolean a
//! checkbox, anything else JSON in a text area. A plugin without a schema
//! gets one text area for the whole config. The plugin's own
//! `validate_config` still decides what is valid.

use serde_json::{Map, Value};

/// The prefix of config fields' names in the form.
const PREFIX: &str = "cfg.";

/// How a field is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Text,
    Secret,
    Integer,
    Number,
    Checkbox,
    Select(Vec<String>),
    Json,
}

/// One field of the config form.
#[derive(Debug, Clone)]
pub struct Field {
    /// The property (the whole config for a plugin without a schema: "").
    pub property: String,
    /// The form field's name.
    pub name: String,
    pub label: String,
    pub hint: Option<String>,
    pub kind: Kind,
    pub required: bool,
    /// The value shown (text); a secret's is never shown.
    pub value: String,
    /// A checkbox's state; for a secret, whether one is stored.
    pub checked: bool,
}

impl Field {
    pub fn is_select(&self) -> bool {
        matches!(self.kind, Kind::Select(_))
    }

    /// A select's options.
    pub fn options(&self) -> &[String] {
        match &self.kind {
            Kind::Select(o) => o,
            _ => &[],
        }
    }

    /// The `type` of an `<input>` field.
    pub fn input_type(&self) -> &'static str {
        match self.kind {
            Kind::Secret => "password",
            Kind::Integer | Kind::Number => "number",
            Kind::Checkbox => "checkbox",
            _ => "text",
        }
    }

    pub fn is_textarea(&self) -> bool {
        self.kind == Kind::Json
    }

    pub fn step(&self) -> &'static str {
        if self.kind == Kind::Integer {
            "1"
        } else {
            "any"
        }
    }
}

fn properties(schema: &Value) -> Option<&Map<String, Value>> {
    schema.get("properties")?.as_object()
}

fn kind_of(p: &Value) -> Kind {
    if let Some(options) = p.get("enum").and_then(Value::as_array) {
        return Kind::Select(
            options
                .iter()
                .map(|o| match o {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect(),
        );
    }
    if p.get("writeOnly").and_then(Value::as_bool) == Some(true) {
        return Kind::Secret;
    }
    match p.get("type").and_then(Value::as_str) {
        Some("string") => Kind::Text,
        Some("integer") => Kind::Integer,
        Some("number") => Kind::Number,
        Some("boolean") => Kind::Checkbox,
        _ => Kind::Json,
    }
}

/// The form for `config` (the endpoint's current config, or `{}`).
pub fn fields(schema: Option<&Value>, config: &Value) -> Vec<Field> {
    let Some(props) = schema.and_then(properties) else {
        return vec![Field {
            property: String::new(),
            name: "config".into(),
            label: "Config (JSON)".into(),
            hint: Some(
                "This plugin describes no config fields: the config as a JSON object.".into(),
            ),
            kind: Kind::Json,
            required: false,
            value: serde_json::to_string_pretty(config).unwrap_or_default(),
            checked: false,
        }];
    };
    let required: Vec<&str> = schema
        .and_then(|s| s.get("required"))
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    props
        .iter()
        .map(|(name, p)| {
            let kind = kind_of(p);
            let current = config.get(name).filter(|v| !v.is_null());
            let value = match (&kind, current) {
                (Kind::Secret, _) | (_, None) => String::new(),
                (Kind::Json, Some(v)) => serde_json::to_string_pretty(v).unwrap_or_default(),
                (_, Some(Value::String(s))) => s.clone(),
                (_, Some(v)) => v.to_string(),
            };
            let checked = match kind {
                Kind::Checkbox => current.and_then(Value::as_bool).unwrap_or(false),
                Kind::Secret => current.is_some(),
                _ => false,
            };
            let mut hint = p
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string);
            if kind == Kind::Json {
                hint = Some(hint.map_or_else(|| "JSON".to_string(), |h| format!("{h} (JSON)")));
            }
            Field {
                property: name.clone(),
                name: format!("{PREFIX}{name}"),
                label: p
                    .get("title")
                    .and_then(Value::as_str)
                    .unwrap_or(name)
                    .to_string(),
                hint,
                required: required.contains(&name.as_str()),
                kind,
                value,
                checked,
            }
        })
        .collect()
}

/// The config a submitted form describes; `current` is the stored config
/// when editing (its secrets are kept when their field is left blank).
/// An error names the field.
pub fn config(
    schema: Option<&Value>,
    form: &[(String, String)],
    current: Option<&Value>,
) -> Result<Value, String> {
    let get = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(props) = schema.and_then(properties) else {
        let text = get("config").unwrap_or("").trim();
        if text.is_empty() {
            return Ok(Value::Object(Map::new()));
        }
        return match serde_json::from_str::<Value>(text) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(_) => Err("Config (JSON): must be a JSON object".into()),
            Err(e) => Err(format!("Config (JSON): not JSON: {e}")),
        };
    };
    let mut out = Map::new();
    for (name, p) in props {
        let field = format!("{PREFIX}{name}");
        let given = get(&field).map(str::trim).unwrap_or("");
        let kind = kind_of(p);
        let value = match kind {
            Kind::Checkbox => get(&field).is_some().then_some(Value::Bool(true)),
            _ if given.is_empty() => match kind {
                Kind::Secret => current.and_then(|c| c.get(name)).cloned(),
                _ => None,
            },
            Kind::Text | Kind::Secret => Some(Value::String(given.to_string())),
            Kind::Select(_) => Some(
                p.get("enum")
                    .and_then(Value::as_array)
                    .and_then(|o| {
                        o.iter().find(|o| match o {
                            Value::String(s) => s == given,
                            other => {
                                serde_json::from_str::<Value>(given).ok().as_ref() == Some(other)
                            }
                        })
                    })
                    .cloned()
                    .ok_or_else(|| format!("{name}: \"{given}\" is not one of the choices"))?,
            ),
            Kind::Integer => {
                Some(Value::from(given.parse::<i64>().map_err(|_| {
                    format!("{name}: \"{given}\" is not a whole number")
                })?))
            }
            Kind::Number => Some(
                given
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(|| format!("{name}: \"{given}\" is not a number"))?,
            ),
            Kind::Json => Some(
                serde_json::from_str::<Value>(given)
                    .map_err(|e| format!("{name}: not JSON: {e}"))?,
            ),
        };
        if let Some(v) = value {
            out.insert(name.clone(), v);
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "required": ["url"], "properties": {
            "url": {"type": "string"},
            "method": {"enum": ["POST", "PUT"]},
            "password": {"type": "string", "writeOnly": true},
            "retries": {"type": "integer"},
            "tls": {"type": "boolean"},
            "headers": {"type": "object"}
        }})
    }

    fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_kind_of_field_round_trips() {
        let s = schema();
        let current = json!({"url": "http://x", "method": "PUT", "password": "s3cret",
            "retries": 3, "tls": true, "headers": {"a": "b"}});
        let f = fields(Some(&s), &current);
        let by = |n: &str| f.iter().find(|x| x.property == n).unwrap();
        assert!(by("url").required && by("url").value == "http://x");
        assert_eq!(
            by("method").kind,
            Kind::Select(vec!["POST".into(), "PUT".into()])
        );
        assert_eq!(by("password").value, "", "a secret is never shown");
        assert!(by("password").checked);
        assert!(by("tls").checked);
        assert!(by("headers").value.contains("\"a\""));
        let back = config(
            Some(&s),
            &form(&[
                ("cfg.url", "http://y"),
                ("cfg.method", "POST"),
                ("cfg.password", ""),
                ("cfg.retries", "4"),
                ("cfg.headers", "{\"c\": \"d\"}"),
            ]),
            Some(&current),
        )
        .unwrap();
        assert_eq!(
            back,
            json!({"url": "http://y", "method": "POST", "password": "s3cret", "retries": 4,
                "headers": {"c": "d"}})
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let s = schema();
        let e = config(Some(&s), &form(&[("cfg.retries", "x")]), None).unwrap_err();
        assert!(e.starts_with("retries:"), "{e}");
        let e = config(Some(&s), &form(&[("cfg.method", "GET")]), None).unwrap_err();
        assert!(e.starts_with("method:"), "{e}");
        let e = config(Some(&s), &form(&[("cfg.headers", "{")]), None).unwrap_err();
        assert!(e.starts_with("headers:"), "{e}");
    }

    #[test]
    fn without_a_schema_the_config_is_json() {
        let f = fields(None, &json!({"a": 1}));
        assert_eq!(f.len(), 1);
        assert_eq!(
            config(None, &form(&[("config", "{\"a\": 2}")]), None).unwrap(),
            json!({"a": 2})
        );
        assert_eq!(
            config(None, &form(&[("config", " ")]), None).unwrap(),
            json!({})
        );
        assert!(config(None, &form(&[("config", "[1]")]), None).is_err());
    }
}
