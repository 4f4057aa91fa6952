//! Reading management request bodies: a JSON object whose fields are
//! checked one by one, so every bad value is a 400 naming the field.
//!
//! Conventions shared by every resource: `k` (the master key) may appear in
//! any body; protected fields are 405; unknown fields are 400; `null` for a
//! field that cannot be null means "leave unchanged" (robogerctl's `apply`
//! sends every field, set or not).

use serde_json::{Map, Value};

use super::error::{ApiError, bad};
use crate::level::{Level, LevelMatch};
use crate::store::entity::TEXT_COLUMN_MAX;

/// A parsed management request body.
#[derive(Debug, Default, Clone)]
pub struct Body(Map<String, Value>);

impl Body {
    /// Parses a body: empty is `{}`, anything but a JSON object is 400.
    pub fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body::default());
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(v) => Body::from_value(v),
            Err(e) => Err(bad(format!("the request body is not valid JSON: {e}"))),
        }
    }

    /// A body from a JSON value (the console's forms arrive this way):
    /// `null` is `{}`, anything but an object is 400.
    pub fn from_value(v: Value) -> Result<Body, ApiError> {
        match v {
            Value::Object(m) => {
                // No database here stores U+0000 in text (PostgreSQL refuses
                // it in text and JSON): refused up front, naming the field.
                if let Some((k, _)) = m.iter().find(|(k, v)| k.contains('\0') || holds_nul(v)) {
                    return Err(bad(format!(
                        "field {k:?} holds a NUL character (U+0000), which cannot be stored"
                    )));
                }
                Ok(Body(m))
            }
            Value::Null => Ok(Body::default()),
            _ => Err(bad("the request body must be a JSON object")),
        }
    }

    /// The `k` field (the master key), if given as a string.
    pub fn key(&self) -> Option<&str> {
        self.0.get("k").and_then(Value::as_str)
    }

    /// Refuses protected fields (405) and any field not in `allowed` (400).
    pub fn only(&self, allowed: &[&str], protected: &[&str]) -> Result<(), ApiError> {
        for (k, v) in &self.0 {
            if k == "k" {
                if !v.is_string() {
                    return Err(bad("field \"k\" (the master key) must be a string"));
                }
                continue;
            }
            if allowed.contains(&k.as_str()) {
                continue;
            }
            if protected.contains(&k.as_str()) {
                return Err(ApiError::MethodNotAllowed(format!(
                    "Field \"{k}\" is protected"
                )));
            }
            return Err(bad(format!(
                "unknown field {k:?}; allowed: {}",
                allowed.join(", ")
            )));
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// A required string field.
    pub fn required_str(&self, key: &str) -> Result<&str, ApiError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(bad(format!("field \"{key}\" must be a string"))),
            None => Err(bad(format!("field \"{key}\" is required"))),
        }
    }

    /// `active`: 0/1 or false/true; `null` or absent is `None`.
    pub fn active(&self, key: &str) -> Result<Option<i16>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(i16::from(*b))),
            Some(Value::Number(n)) if n.as_i64() == Some(0) || n.as_i64() == Some(1) => {
                Ok(n.as_i64().map(|v| v as i16))
            }
            Some(Value::String(s)) if s == "0" || s == "1" => {
                Ok(Some(if s == "1" { 1 } else { 0 }))
            }
            Some(v) => Err(bad(format!("field \"{key}\" must be 0 or 1, not {v}"))),
        }
    }

    /// A non-negative integer (also as text of up to 18 digits).
    pub fn count(&self, key: &str) -> Result<Option<i64>, ApiError> {
        let err = |v: &Value| {
            bad(format!(
                "field \"{key}\" must be a non-negative integer, not {v}"
            ))
        };
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::Number(n)) => n
                .as_i64()
                .filter(|n| *n >= 0)
                .map(Some)
                .ok_or_else(|| err(v)),
            Some(v @ Value::String(s)) => digits(s).map(Some).ok_or_else(|| err(v)),
            Some(v) => Err(err(v)),
        }
    }

    /// A nullable text column: absent is `None`; `null` and `""` clear it
    /// (`Some(None)`); longer than the column is 400.
    pub fn nullable_text(&self, key: &str) -> Result<Option<Option<String>>, ApiError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(Value::String(s)) if s.is_empty() => Ok(Some(None)),
            Some(Value::String(s)) => {
                if s.chars().count() > TEXT_COLUMN_MAX {
                    Err(bad(format!(
                        "field \"{key}\" is longer than {TEXT_COLUMN_MAX} characters"
                    )))
                } else {
                    Ok(Some(Some(s.clone())))
                }
            }
            Some(v) => Err(bad(format!(
                "field \"{key}\" must be a string or null, not {v}"
            ))),
        }
    }

    /// A JSON object field; `null` or absent is `None`.
    pub fn object(&self, key: &str) -> Result<Option<Value>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
            Some(_) => Err(bad(format!("field \"{key}\" must be a JSON object"))),
        }
    }

    /// A level, converted like the original's `convert_level`.
    pub fn level(&self, key: &str) -> Result<Option<Level>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ (Value::Number(_) | Value::String(_))) => Ok(Some(Level::convert(v))),
            Some(v) => Err(bad(format!(
                "field \"{key}\" must be a level name or number, not {v}"
            ))),
        }
    }

    /// A level rule: `e g ge l le` (and `gt`, `lt`); `""` is the default `ge`.
    pub fn level_match(&self, key: &str) -> Result<Option<LevelMatch>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(Some(LevelMatch::default())),
            Some(Value::String(s)) => LevelMatch::parse(s).map(Some).ok_or_else(|| {
                bad(format!(
                    "field \"{key}\" must be one of e, g, ge, l, le (or gt, lt), not \"{s}\""
                ))
            }),
            Some(v) => Err(bad(format!("field \"{key}\" must be a string, not {v}"))),
        }
    }

    /// A boolean (also 0/1).
    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Number(n)) if n.as_i64() == Some(0) || n.as_i64() == Some(1) => {
                Ok(n.as_i64() == Some(1))
            }
            Some(v) => Err(bad(format!(
                "field \"{key}\" must be true or false, not {v}"
            ))),
        }
    }

    /// An integer id (also as text of up to 18 digits).
    pub fn id(&self, key: &str) -> Result<i64, ApiError> {
        match self.get(key) {
            Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64().unwrap_or_default()),
            Some(Value::String(s)) => digits(s).ok_or_else(|| {
                bad(format!(
                    "field \"{key}\" must be an integer id, not \"{s}\""
                ))
            }),
            Some(v) => Err(bad(format!(
                "field \"{key}\" must be an integer id, not {v}"
            ))),
            None => Err(bad(format!("field \"{key}\" is required"))),
        }
    }

    /// The raw value of a field, `null` included.
    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }
}

/// A whole number written as text: 1 to 18 ASCII digits (so it always
/// fits an `i64`), nothing else; what `openapi.yaml` calls `Digits`.
fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 18 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Whether a string anywhere in `v` (keys included) holds U+0000.
fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(holds_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b(s: &str) -> Body {
        Body::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn parse_shapes() {
        assert!(Body::parse(b"").is_ok());
        assert!(Body::parse(b"null").is_ok());
        assert!(Body::parse(b"[1]").is_err());
        assert!(Body::parse(b"{").is_err());
        assert!(Body::parse(br#"{"config": {"t": ["a\u0000"]}}"#).is_err());
    }

    #[test]
    fn field_rules() {
        let body = b(r#"{"active": null, "lim_c": 5, "k": "x", "location": "", "level": "warn"}"#);
        assert!(
            body.only(&["active", "lim_c", "location", "level"], &["id"])
                .is_ok()
        );
        assert_eq!(body.active("active").unwrap(), None);
        assert_eq!(body.count("lim_c").unwrap(), Some(5));
        assert_eq!(body.nullable_text("location").unwrap(), Some(None));
        assert_eq!(body.level("level").unwrap(), Some(Level::Warning));
        assert_eq!(body.key(), Some("x"));
        assert!(matches!(
            b(r#"{"id": 1}"#).only(&["a"], &["id"]),
            Err(ApiError::MethodNotAllowed(_))
        ));
        assert!(matches!(
            b(r#"{"x": 1}"#).only(&["a"], &["id"]),
            Err(ApiError::BadRequest(_))
        ));
        assert!(b(r#"{"active": 2}"#).active("active").is_err());
        assert!(b(r#"{"lim_c": -1}"#).count("lim_c").is_err());
        assert_eq!(b(r#"{"lim_c": "42"}"#).count("lim_c").unwrap(), Some(42));
        for refused in ["-1", " 4", "+4", "1234567890123456789", ""] {
            let body = b(&json!({"lim_c": refused, "target": refused}).to_string());
            assert!(body.count("lim_c").is_err(), "{refused}");
            assert!(body.id("target").is_err(), "{refused}");
        }
        assert!(
            b(r#"{"level_match": "eq"}"#)
                .level_match("level_match")
                .is_err()
        );
        let long = format!(r#"{{"tag": "{}"}}"#, "x".repeat(256));
        assert!(b(&long).nullable_text("tag").is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const KEYS: [&str; 8] = [
            "active",
            "lim_c",
            "location",
            "level",
            "level_match",
            "target",
            "replace",
            "k",
        ];

        fn value() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,300}".prop_map(Value::String),
                "[0-9]{0,20}".prop_map(Value::String),
                Just(json!({"a": [1, "\u{0}"]})),
            ]
        }

        proptest! {
            /// Every check of every field either passes or refuses with a
            /// 400 (405 for a protected field) whose text names the field.
            #[test]
            fn every_refusal_names_its_field(
                fields in prop::collection::btree_map(
                    prop_oneof![4 => prop::sample::select(KEYS.to_vec()).prop_map(String::from), 1 => ".{0,6}"],
                    value(),
                    0..6,
                )
            ) {
                let text = serde_json::to_vec(&fields).unwrap();
                let body = match Body::parse(&text) {
                    Ok(b) => b,
                    Err(ApiError::BadRequest(why)) => {
                        prop_assert!(fields.keys().any(|k| why.contains(&format!("{k:?}"))), "{}", why);
                        return Ok(());
                    }
                    Err(e) => panic!("{e:?}"),
                };
                let refusals = [
                    ("", body.only(&KEYS[..7], &["id"]).err()),
                    ("active", body.active("active").err()),
                    ("lim_c", body.count("lim_c").err()),
                    ("location", body.nullable_text("location").err()),
                    ("level", body.level("level").err()),
                    ("level_match", body.level_match("level_match").err()),
                    ("target", body.id("target").err()),
                    ("replace", body.flag("replace").err()),
                ];
                for (key, e) in refusals {
                    let Some(e) = e else { continue };
                    let why = e.to_string();
                    prop_assert!(matches!(e, ApiError::BadRequest(_) | ApiError::MethodNotAllowed(_)));
                    if key.is_empty() {
                        prop_assert!(fields.keys().any(|k| why.contains(&format!("{k:?}"))), "{}", why);
                    } else {
                        prop_assert!(why.contains(&format!("{key:?}")), "{}", why);
                    }
                }
            }
        }
    }
}
