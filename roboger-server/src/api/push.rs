//! `POST /push`: a sender's event, from a JSON body, a form (URL-encoded
//! or multipart) or the query string (as the original accepted them),
//! answered 202 once it and its deliveries are committed. A push another Roboger forwarded says how
//! often the event was forwarded already (`X-Roboger-Hops`); past
//! [`MAX_HOPS`] it is refused (409, which only this refusal answers
//! here), so chain endpoints that forward to each other do not pass an
//! event round for ever.

use base64::Engine;
use bytes::Bytes;
use http::StatusCode;
use serde_json::{Map, Value};

use roboger_plugin_sdk::protocol::HOPS_HEADER;

use super::charset;
use super::error::ApiError;
use super::form::{Form, Upload};
use super::reply::{self, Response};
use crate::App;
use crate::event::{Event, MAX_HOPS};
use crate::pipeline::AcceptError;
use crate::routing::Matchable;
use crate::store::StoreError;

/// The body limit of a push whose media may be `max_media` bytes
/// (base64 is 4/3 of it, plus room for the other fields).
pub fn body_limit(max_media: usize) -> usize {
    max_media / 3 * 4 + 1024 * 1024
}

/// A push's fields: the query string's and the body's (a JSON object,
/// or a form of either kind when labelled so and not JSON). As in the
/// original (flask-restx over werkzeug), a field sent twice is taken
/// where it came first, the query string before a form, but a JSON
/// body's over the query string's. A body that is neither is a 400
/// saying so. A multipart form's file in its `media` part is the event's
/// media (raw there, base64 here as in a JSON push), named by its file
/// name unless `media_fname` is sent.
pub async fn fields(
    query: &str,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<Map<String, Value>, ApiError> {
    let mut fields = Map::new();
    let first = |fields: &mut Map<String, Value>, k: String, v: String| {
        fields.entry(k).or_insert(Value::String(v));
    };
    for (k, v) in charset::form_pairs(query.as_bytes(), None)? {
        first(&mut fields, k, v);
    }
    // A JSON object is taken as JSON whatever the Content-Type says
    // (curl -d sends JSON labelled as a form).
    if content_type.is_some_and(Form::is_form) && !charset::looks_json(&body) {
        // The form's reader takes the body, so it is not held beside its
        // copy (multer's) while the fields are made.
        let form = Form::parse(content_type, body, "media").await?;
        if form.file.is_some() && form.get("media").is_some() {
            return Err(ApiError::BadRequest(
                "field \"media\" was sent both as a file and as base64 text; send one".into(),
            ));
        }
        for (k, v) in form.fields {
            first(&mut fields, k, v);
        }
        if let Some(file) = form.file {
            insert_media(&mut fields, file);
        }
    } else if !body.iter().all(u8::is_ascii_whitespace) {
        let body = charset::json(body, charset::declared(content_type)?)?;
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => fields.extend(m),
            Ok(Value::Null) => {}
            Ok(_) => {
                return Err(ApiError::BadRequest(
                    "the request body must be a JSON object".into(),
                ));
            }
            Err(e) => {
                return Err(ApiError::BadRequest(format!(
                    "the request body is not valid JSON: {e}"
                )));
            }
        }
    }
    Ok(fields)
}

/// Makes an uploaded `file` the fields' media: base64 as a JSON push
/// sends it, named by the file's name unless `media_fname` is there.
/// Returns its size.
pub fn insert_media(fields: &mut Map<String, Value>, file: Upload) -> usize {
    let size = file.data.len();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&file.data);
    drop(file.data);
    fields.insert("media".into(), Value::String(encoded));
    if let (Some(name), false) = (file.name, fields.contains_key("media_fname")) {
        fields.insert("media_fname".into(), Value::String(name));
    }
    size
}

/// A header whose value is not visible ASCII text.
#[derive(Debug, Clone, Copy)]
pub struct NotText;

impl NotText {
    /// The 400 for header `name` holding such a value.
    fn refused(name: &str) -> ApiError {
        ApiError::BadRequest(format!("the {name} header is not ASCII text"))
    }
}

/// The hops a push's [`HOPS_HEADER`] says (none: pushed directly).
pub fn hops(header: Result<Option<String>, NotText>) -> Result<u16, ApiError> {
    let Some(h) = header.map_err(|NotText| NotText::refused(HOPS_HEADER))? else {
        return Ok(0);
    };
    let digits = h.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::BadRequest(format!(
            "{HOPS_HEADER} must be the number of times the event was forwarded, not {h:?}"
        )));
    }
    // Any number past the limit is refused as the limit is.
    Ok(digits.parse().unwrap_or(u16::MAX))
}

/// The headers a push is read by, as they came.
pub struct Headers {
    pub content_type: Result<Option<String>, NotText>,
    pub content_encoding: Result<Option<String>, NotText>,
    /// [`HOPS_HEADER`]
    pub hops: Result<Option<String>, NotText>,
}

/// Handles one push, whose body was read whole.
pub async fn push(
    app: &App,
    query: &str,
    headers: Headers,
    body: Bytes,
) -> Result<Response, ApiError> {
    let hops = self::hops(headers.hops)?;
    let content_type = headers
        .content_type
        .map_err(|NotText| NotText::refused("Content-Type"))?;
    // A compressed body would be read as text and refused for what it
    // seems to say ("not valid JSON", no addr): say what it is instead.
    match headers.content_encoding {
        Ok(None) => {}
        Ok(Some(e)) if e.trim().eq_ignore_ascii_case("identity") => {}
        Ok(Some(e)) => return Err(ApiError::UnsupportedEncoding(e)),
        Err(NotText) => return Err(NotText::refused("Content-Encoding")),
    }
    // What counts against `lim_s`: the request's size, as in the original.
    let body_len = body.len() + query.len();
    // A push with media is at its largest while its fields are made:
    // the body is gone once they are, and the fields once the event is.
    let fields = fields(query, content_type.as_deref(), body).await?;
    push_fields(app, fields, hops, body_len).await?;
    Ok(reply::empty(StatusCode::ACCEPTED))
}

/// Takes one event made of `fields` (a push's, or the console's test
/// event), forwarded `hops` times before; `size` is what counts against
/// the address's `lim_s`. `Ok` once it and its deliveries are committed;
/// every refusal is an [`ApiError`].
pub async fn push_fields(
    app: &App,
    fields: Map<String, Value>,
    hops: u16,
    body_len: usize,
) -> Result<(), ApiError> {
    let mut event = Event::from_fields(fields).map_err(|e| ApiError::BadRequest(e.0))?;
    if hops >= MAX_HOPS {
        tracing::warn!(addr = %event.addr, hops, "push refused: forwarded too often, a loop of chain endpoints?");
        return Err(ApiError::Conflict(format!(
            "the event has been forwarded by {hops} Roboger servers already, and at most \
             {MAX_HOPS} may: do chain endpoints forward it in a loop?"
        )));
    }
    event.hops = hops;
    if event
        .media
        .as_ref()
        .is_some_and(|m| m.len() > app.config.push_max_media)
    {
        return Err(ApiError::MediaTooLarge(app.config.push_max_media));
    }
    let Some(routes) = app.routes.get(&event.addr) else {
        return Err(ApiError::NotFound(format!("addr {} not found", event.addr)));
    };
    if routes.being_deleted {
        // Its deletion was answered: accepted now, the event would be
        // deleted with it, delivered or not.
        return Err(ApiError::NotFound(format!(
            "addr {} not found: it is being deleted",
            event.addr
        )));
    }
    if !routes.active {
        return Err(ApiError::Disabled(format!(
            "addr {} is disabled",
            event.addr
        )));
    }
    let level = event.level;
    let ready = app.pipeline.ready(event, routes.id).map_err(refused)?;
    let event = ready.event();
    let mut charge = None;
    if let Some(limits) = &app.config.limits {
        let check = crate::limits::check(
            (&app.store, &app.counters),
            limits,
            &routes,
            &event.addr,
            level,
            body_len,
        );
        match tokio::time::timeout(app.config.timeout, check).await {
            Ok(Ok(counted)) => charge = Some(counted),
            Ok(Err(crate::limits::LimitError::Over { text, retry })) => {
                return Err(ApiError::OverLimit { text, retry });
            }
            Ok(Err(crate::limits::LimitError::Store(e))) => return Err(e.into()),
            Err(_) => return Err(StoreError::Unanswered(app.config.timeout).into()),
        }
    }
    let targets = routes.targets(&Matchable {
        level: level.code(),
        location: event.location.as_deref(),
        tag: event.tag.as_deref(),
        sender: event.sender.as_deref(),
    });
    tracing::debug!(event_id = %event.id, addr_id = routes.id, deliveries = targets.len(), "push accepted");
    let accepted = app.pipeline.accept(ready, targets).await;
    if let (Err(_), Some(charge)) = (&accepted, charge) {
        // Not stored: a sender that sends it again is not to be counted
        // twice for it.
        app.counters.refund(&app.store, charge);
    }
    accepted.map_err(refused)
}

/// What the sender is told of an event the pipeline refused.
fn refused(e: AcceptError) -> ApiError {
    match e {
        AcceptError::AddrGone(addr) => ApiError::NotFound(format!("addr {addr} not found")),
        AcceptError::TooLarge(most) => ApiError::EventTooLarge(most),
        // The writer has logged the database's words; they are not the
        // sender's business.
        AcceptError::Store(_) => ApiError::Unavailable(
            "cannot store the event: database error; see the server log".into(),
        ),
        e => ApiError::Unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_are_a_whole_number_and_past_u16_read_as_its_largest() {
        let text = |h: &str| Ok(Some(h.to_string()));
        assert_eq!(hops(Ok(None)).ok(), Some(0));
        for (h, n) in [("0", 0), (" 7 ", 7), ("8", 8), ("65535", 65535)] {
            assert_eq!(hops(text(h)).ok(), Some(n), "{h:?}");
        }
        for h in ["65536", "99999999999999999999999"] {
            assert_eq!(hops(text(h)).ok(), Some(u16::MAX), "{h:?}");
        }
        let bad = ["", " ", "x", "-1", "+1", "1.0", "1 2", "٣"].map(text);
        for h in bad.into_iter().chain([Err(NotText)]) {
            let said = format!("{h:?}");
            assert!(
                matches!(hops(h), Err(ApiError::BadRequest(m)) if m.contains(HOPS_HEADER)),
                "{said}"
            );
        }
    }
}
