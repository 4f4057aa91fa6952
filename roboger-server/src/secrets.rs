//! Secrets kept out of logs and error texts. A plugin's JSON Schemas (its
//! plugin config's and its endpoint config's, announced in its handshake)
//! mark secret fields `writeOnly`; their values are registered here as the
//! configs are met (a plugin starting, an endpoint created or delivered
//! to), and every log line the server writes, its plugins' lines
//! included, every delivery's `last_error` and every plugin error answered
//! to a client, has them replaced by `[secret]`.
//!
//! The management API still returns configs whole to the master key
//! (robogerctl needs them); only what is logged or reported is scrubbed.
//!
//! Invariant: every log line goes out through [`scrub`] (in
//! [`crate::log_writer`]), and every text a plugin produced passes it
//! before it is stored or answered.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, RwLock};

use aho_corasick::AhoCorasick;
use serde_json::Value;

/// What a secret is replaced with.
pub const MASK: &str = roboger_plugin_sdk::secret::MASK;
/// Shorter values are not treated as secrets (they would mask ordinary words).
const MIN_LEN: usize = 4;
/// The most secrets remembered; past it, new ones are not added (and a
/// warning says so once).
const MAX_SECRETS: usize = 100_000;

#[derive(Default)]
struct Registry {
    values: BTreeSet<String>,
    matcher: Option<Arc<AhoCorasick>>,
    full: bool,
}

static REGISTRY: RwLock<Option<Registry>> = RwLock::new(None);

/// The values of the fields `schema` marks `writeOnly` in `config` (at any
/// depth of `properties`).
pub fn of(schema: &Value, config: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect(schema, config, &mut out);
    out
}

fn collect(schema: &Value, config: &Value, out: &mut Vec<String>) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, p) in props {
        let Some(v) = config.get(name) else { continue };
        if p.get("writeOnly").and_then(Value::as_bool) == Some(true) {
            match v {
                Value::String(s) => out.push(s.clone()),
                Value::Null => {}
                other => out.push(other.to_string()),
            }
        } else {
            collect(p, v, out);
        }
    }
}

/// Whether `schema` marks any field `writeOnly`.
pub fn has_secrets(schema: &Value) -> bool {
    match schema {
        Value::Object(m) => {
            m.get("writeOnly").and_then(Value::as_bool) == Some(true) || m.values().any(has_secrets)
        }
        Value::Array(a) => a.iter().any(has_secrets),
        _ => false,
    }
}

/// Remembers secret values, so logs and reports leave them out.
pub fn register(values: impl IntoIterator<Item = String>) {
    let fresh: Vec<String> = values
        .into_iter()
        .filter(|v| v.chars().count() >= MIN_LEN)
        .collect();
    if fresh.is_empty() {
        return;
    }
    // Usually every one is known already (a delivery's config).
    let known = REGISTRY.read().is_ok_and(|r| {
        r.as_ref()
            .is_some_and(|r| fresh.iter().all(|v| r.values.contains(v)))
    });
    if known {
        return;
    }
    let Ok(mut guard) = REGISTRY.write() else {
        return;
    };
    let reg = guard.get_or_insert_with(Registry::default);
    let mut changed = false;
    for v in fresh {
        if reg.values.contains(&v) {
            continue;
        }
        if reg.values.len() >= MAX_SECRETS {
            if !reg.full {
                reg.full = true;
                // Not eprintln!, which panics when stderr is gone.
                let _ = writeln!(
                    std::io::stderr(),
                    "WARN roboger: more than {MAX_SECRETS} secrets; later ones are not masked in logs"
                );
            }
            break;
        }
        reg.values.insert(v);
        changed = true;
    }
    if changed {
        // Longest first, so a secret that holds another is masked whole.
        let mut list: Vec<&String> = reg.values.iter().collect();
        list.sort_by_key(|s| std::cmp::Reverse(s.len()));
        reg.matcher = AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(list)
            .ok()
            .map(Arc::new);
    }
}

fn matcher() -> Option<Arc<AhoCorasick>> {
    REGISTRY.read().ok()?.as_ref()?.matcher.clone()
}

/// `text` with every registered secret replaced by [`MASK`], and the
/// JSON-escaped form of each too (as it appears in wire messages).
pub fn scrub(text: &str) -> Cow<'_, str> {
    let Some(m) = matcher() else {
        return Cow::Borrowed(text);
    };
    if !m.is_match(text) {
        return Cow::Borrowed(text);
    }
    let masks = vec![MASK; m.patterns_len()];
    Cow::Owned(m.replace_all(text, &masks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn write_only_fields_are_found_and_masked() {
        let schema = json!({"properties": {
            "smtp": {"properties": {"password": {"type": "string", "writeOnly": true},
                                    "host": {"type": "string"}}},
            "token": {"writeOnly": true}
        }});
        let config =
            json!({"smtp": {"password": "pa55word-x", "host": "mail"}, "token": "tok-12345"});
        let mut found = of(&schema, &config);
        found.sort();
        assert_eq!(
            found,
            vec!["pa55word-x".to_string(), "tok-12345".to_string()]
        );
        register(found);
        register(["abc".to_string()]);
        assert_eq!(
            scrub("login with pa55word-x failed; host mail; abc"),
            "login with [secret] failed; host mail; abc"
        );
        assert!(matches!(scrub("nothing here"), Cow::Borrowed(_)));
    }
}
