//! An event as a sender pushes it: the original's `/push` fields (from a
//! JSON body, a form or the query string), checked and completed (level,
//! `formatted_subject`, media) into an [`Event`] with a fresh UUID.

use base64::Engine;
use serde_json::{Map, Value};

use crate::level::Level;

/// A push the server accepted for routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// A fresh UUID; plugins get it as `event_id`.
    pub id: String,
    /// The address pushed to.
    pub addr: String,
    pub msg: String,
    pub subject: String,
    pub formatted_subject: String,
    pub level: Level,
    pub location: Option<String>,
    pub tag: Option<String>,
    pub sender: Option<String>,
    /// Decoded media; invalid base64 is dropped (and logged).
    pub media: Option<Vec<u8>>,
    /// The media's file name, without any directory part.
    pub media_fname: Option<String>,
    /// How many Roboger servers forwarded it before this one took it
    /// (the push's `X-Roboger-Hops`; 0 when pushed directly).
    pub hops: u16,
}

/// The most times an event may have been forwarded from one Roboger
/// server to another (by the chain plugin) when it arrives: a push that
/// says it has been forwarded this often is refused (409), which ends a
/// loop of chain endpoints at its ninth server, or its ninth time round
/// one server. Real chains are a hop or two long.
pub const MAX_HOPS: u16 = 8;

/// Why a push was refused before routing (always a 400).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct BadPush(pub String);

const FIELDS: [&str; 11] = [
    "addr",
    "sender",
    "msg",
    "subject",
    "level",
    "location",
    "tag",
    "keywords",
    "expires",
    "media",
    "media_fname",
];

impl Event {
    /// Builds an event from the pushed fields (already merged from the
    /// query string and the body), moving their strings into it.
    pub fn from_fields(mut fields: Map<String, Value>) -> Result<Event, BadPush> {
        if let Some(k) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(BadPush(format!(
                "unknown field {k:?}; allowed: {}",
                FIELDS.join(", ")
            )));
        }
        let addr = take_text(&mut fields, "addr")?
            .filter(|a| !a.is_empty())
            .ok_or_else(|| BadPush("field \"addr\" is required".into()))?;
        let level = match fields.remove("level") {
            None | Some(Value::Null) => Level::Info,
            Some(v @ (Value::Number(_) | Value::String(_))) => Level::convert(&v),
            Some(_) => {
                return Err(BadPush(
                    "field \"level\" must be a level name or number".into(),
                ));
            }
        };
        let location = take_text(&mut fields, "location")?.filter(|s| !s.is_empty());
        let sender = take_text(&mut fields, "sender")?.filter(|s| !s.is_empty());
        // `keywords` is the obsolete name of `tag`, and wins as in the original.
        let tag = match take_text(&mut fields, "keywords")? {
            Some(k) => Some(k),
            None => take_text(&mut fields, "tag")?,
        }
        .filter(|s| !s.is_empty());
        let subject = take_text(&mut fields, "subject")?.unwrap_or_default();
        let msg = take_text(&mut fields, "msg")?.unwrap_or_default();
        // Decoded from the field itself: a large media is not copied first.
        let media_field = fields.remove("media");
        let b64 = match &media_field {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()).filter(|m| !m.is_empty()),
            Some(_) => return Err(BadPush("field \"media\" must be a string".into())),
        };
        let (media, media_fname) = match b64 {
            None => (None, take_text(&mut fields, "media_fname")?),
            Some(b64) => match decode_base64(b64) {
                Some(bytes) => {
                    let fname =
                        take_text(&mut fields, "media_fname")?.map(|f| match f.rsplit_once('/') {
                            Some((_, base)) => base.to_string(),
                            None => f,
                        });
                    (Some(bytes), fname)
                }
                None => {
                    tracing::warn!(%addr, "invalid media (not base64) dropped from a push");
                    (None, None)
                }
            },
        };
        drop(media_field);
        let formatted_subject =
            formatted_subject(level, sender.as_deref(), location.as_deref(), &subject);
        Ok(Event {
            id: uuid::Uuid::now_v7().to_string(),
            addr,
            msg,
            subject,
            formatted_subject,
            level,
            location,
            tag,
            sender,
            media,
            media_fname,
            hops: 0,
        })
    }

    /// The media as base64, as it travels to plugins.
    pub fn media_encoded(&self) -> Option<String> {
        self.media
            .as_ref()
            .map(|m| base64::engine::general_purpose::STANDARD.encode(m))
    }
}

/// Field `k` of a push as text, taken out of `fields`: a number or a
/// boolean as its JSON spelling, null as absent.
fn take_text(fields: &mut Map<String, Value>, k: &str) -> Result<Option<String>, BadPush> {
    match fields.remove(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.contains('\0') => Err(BadPush(format!(
            "field \"{k}\" holds a NUL character (U+0000), which cannot be stored"
        ))),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
        Some(_) => Err(BadPush(format!("field \"{k}\" must be a string"))),
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let cleaned: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(&cleaned)
        .ok()
        .or_else(|| {
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(cleaned.trim_end_matches('='))
                .ok()
        })
}

/// `"{LEVEL} {sender}{@location}{: subject}"`: the sender is cut at its
/// first `@` when a location is given; empty parts are left out.
pub fn formatted_subject(
    level: Level,
    sender: Option<&str>,
    location: Option<&str>,
    subject: &str,
) -> String {
    let mut who = String::new();
    if let Some(s) = sender {
        who.push_str(if location.is_some() {
            s.split('@').next().unwrap_or(s)
        } else {
            s
        });
    }
    if let Some(l) = location {
        who.push('@');
        who.push_str(l);
    }
    let mut out = level.name().to_string();
    if !who.is_empty() {
        out.push(' ');
        out.push_str(&who);
    }
    if !subject.is_empty() {
        if who.is_empty() {
            out.push(' ');
        }
        out.push_str(": ");
        out.push_str(subject);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(v: Value) -> Result<Event, BadPush> {
        Event::from_fields(v.as_object().unwrap().clone())
    }

    #[test]
    fn formatted_subjects() {
        assert_eq!(
            formatted_subject(Level::Warning, Some("bot1@host"), Some("lab"), "disk"),
            "WARNING bot1@lab: disk"
        );
        assert_eq!(
            formatted_subject(Level::Warning, Some("bot1@host"), None, "disk"),
            "WARNING bot1@host: disk"
        );
        assert_eq!(formatted_subject(Level::Info, None, None, ""), "INFO");
        assert_eq!(
            formatted_subject(Level::Info, None, Some("lab"), ""),
            "INFO @lab"
        );
        assert_eq!(
            formatted_subject(Level::Error, None, None, "x"),
            "ERROR : x"
        );
    }

    #[test]
    fn fields_defaults_and_errors() {
        let e = ev(json!({"addr": "a", "keywords": "k", "tag": "t", "level": "crit", "media": "aGk=", "media_fname": "/tmp/x/y.txt"})).unwrap();
        assert_eq!(
            (e.tag.as_deref(), e.level, e.media.as_deref()),
            (Some("k"), Level::Critical, Some(&b"hi"[..]))
        );
        assert_eq!(e.media_fname.as_deref(), Some("y.txt"));
        assert_eq!(e.id.len(), 36);
        let e = ev(json!({"addr": "a", "media": "!!not base64!!"})).unwrap();
        assert_eq!(e.media, None);
        assert_eq!(
            (e.msg.as_str(), e.subject.as_str(), e.level),
            ("", "", Level::Info)
        );
        assert!(ev(json!({"msg": "x"})).is_err());
        assert!(
            ev(json!({"addr": "a", "colour": 1}))
                .unwrap_err()
                .0
                .contains("colour")
        );
        assert!(ev(json!({"addr": "a", "msg": {"x": 1}})).is_err());
        assert_eq!(ev(json!({"addr": "a", "expires": 5})).unwrap().addr, "a");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Any JSON value a sender might put in a field.
        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".*".prop_map(Value::String),
            ];
            leaf.prop_recursive(2, 8, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                    prop::collection::btree_map(".{0,4}", inner, 0..3)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Field names: the known ones, mostly, and some others.
        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => prop::sample::select(FIELDS.to_vec()).prop_map(String::from),
                1 => ".{0,8}",
            ]
        }

        proptest! {
            /// Any push becomes an event with an address and a known
            /// level, or a 400 whose text names a field.
            #[test]
            fn any_push_is_an_event_or_names_a_field(
                fields in prop::collection::btree_map(name(), value(), 0..8)
            ) {
                let fields: Map<String, Value> = fields.into_iter().collect();
                match Event::from_fields(fields.clone()) {
                    Ok(e) => {
                        prop_assert!(!e.addr.is_empty());
                        prop_assert!(Level::from_code(i64::from(e.level.code())).is_some());
                        prop_assert!(!e.msg.contains('\0') && !e.subject.contains('\0'));
                    }
                    Err(BadPush(why)) => {
                        let mut names = FIELDS.iter().copied().chain(fields.keys().map(String::as_str));
                        prop_assert!(names.any(|f| why.contains(&format!("{f:?}"))), "{}", why);
                    }
                }
            }
        }
    }
}
