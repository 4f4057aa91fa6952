//! The telegram plugin: a bot that sends events to chats. On load it
//! registers its webhook at `{server url}/plugin/telegram/{key}`, the key
//! derived from the bot token, so every server of a cluster (and every
//! restart) serves and registers the same URL;
//! a chat that sends it `/start` gets its chat id back encrypted and
//! authenticated with a key derived from the bot token, and an endpoint's
//! `chat_id` must be such a code, so nobody can address a chat that did
//! not talk to this bot. Events go out as HTML with the level's emoji,
//! silently for DEBUG, with the media in a second message. A group that
//! became a supergroup is followed there (`Telegram::in_chat`). The Bot
//! API's 400 and 403 (no such chat, the bot blocked or kicked) fail the
//! delivery at once; its flood control is waited for.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hashlink::LruCache;
use roboger_plugin_sdk::http::{client, reqwest};
use roboger_plugin_sdk::markup::escape;
use roboger_plugin_sdk::progress::Progress;
use roboger_plugin_sdk::schema;
use roboger_plugin_sdk::{Event, Host, HttpRequest, HttpResponse, Info, Plugin, PluginError, run};
use roboger_plugin_telegram::chat_code::ChatCodes;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The endpoint config's schema, compiled when the plugin is built.
#[jsonschema::validator(path = "../../schema/plugins/telegram.schema.json")]
struct ConfigSchema;
/// The plugin config's schema, compiled when the plugin is built.
#[jsonschema::validator(path = "../../schema/plugins/telegram.plugin.schema.json")]
struct PluginConfigSchema;
const DEFAULT_API: &str = "https://api.telegram.org";

/// A loaded bot: where its API is, its chat codes and its webhook key.
struct Bot {
    /// `{api-url}/bot{token}`
    api: String,
    codes: ChatCodes,
    /// The last path segment of the webhook URL: secret to whoever does
    /// not know the token, and the same on every server.
    secret: String,
}

struct Telegram {
    bot: RwLock<Option<Arc<Bot>>>,
    /// The deliveries whose text was sent and whose media is still due.
    text_sent: Progress<bool>,
    /// Groups that became supergroups: the old chat id to the new one.
    moved: Mutex<LruCache<i64, i64>>,
}

impl Bot {
    fn new(token: &str, api_url: &str) -> Result<Bot, PluginError> {
        let path: [u8; 32] = Sha256::new()
            .chain_update(b"roboger telegram webhook\0")
            .chain_update(token.as_bytes())
            .finalize()
            .into();
        Ok(Bot {
            api: format!("{}/bot{token}", api_url.trim_end_matches('/')),
            codes: ChatCodes::new(token),
            secret: URL_SAFE_NO_PAD.encode(&path[..24]),
        })
    }

    /// The code a chat gets for its id.
    fn encrypt(&self, chat: i64) -> Result<String, PluginError> {
        self.codes.encrypt(chat).map_err(PluginError::failed)
    }

    /// The chat id in a code, if this bot issued it.
    fn decrypt(&self, code: &str) -> Option<i64> {
        self.codes.decrypt(code)
    }

    /// Calls a Bot API method with a JSON body; Telegram's `ok: false`
    /// is an error with its description.
    async fn call(&self, method: &str, body: Value, timeout: Duration) -> Result<Value, Refusal> {
        let req = client()?.post(format!("{}/{method}", self.api)).json(&body);
        answer(method, req.timeout(timeout)).await
    }
}

/// Why the Bot API did not take a call.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// The group became a supergroup, whose chat id this is
    /// (`parameters.migrate_to_chat_id`); the message is the Bot API's.
    #[error("{1}")]
    Moved(i64, String),
    /// Anything else, as the delivery's error.
    #[error(transparent)]
    Error(#[from] PluginError),
}

impl From<Refusal> for PluginError {
    fn from(r: Refusal) -> PluginError {
        match r {
            Refusal::Moved(_, msg) => PluginError::failed(msg),
            Refusal::Error(e) => e,
        }
    }
}

async fn answer(method: &str, req: reqwest::RequestBuilder) -> Result<Value, Refusal> {
    let resp = req.send().await.map_err(|e| {
        // The URL holds the bot token: it is left out of the error.
        let e = e.without_url();
        roboger_plugin_sdk::http::request_error(method, &e)
    })?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if status.is_success() && v["ok"] == true {
        Ok(v["result"].clone())
    } else {
        let why = v["description"].as_str().unwrap_or("no description");
        let msg = format!("{method}: {status}: {why}");
        if let Some(to) = v["parameters"]["migrate_to_chat_id"].as_i64() {
            return Err(Refusal::Moved(to, msg));
        }
        // Flood control: the Bot API says how long to wait
        // (`parameters.retry_after`, seconds), and the server waits so long.
        match v["parameters"]["retry_after"].as_u64().filter(|s| *s > 0) {
            Some(secs) => Err(PluginError::Later(msg, Duration::from_secs(secs)).into()),
            // Refusals of this chat or this message, which every retry
            // would meet again: 400 (`chat not found`, a message or
            // file it cannot take) and 403 (the bot was blocked by the
            // user, kicked from the group, is not in the channel).
            None if matches!(
                status,
                reqwest::StatusCode::BAD_REQUEST | reqwest::StatusCode::FORBIDDEN
            ) =>
            {
                Err(PluginError::rejected(msg).into())
            }
            None => Err(PluginError::failed(msg).into()),
        }
    }
}

/// How many chats' moves to a supergroup are remembered.
const MOVES: usize = 10_000;

/// The emoji in front of each level's messages.
fn emoji(level: u8) -> &'static str {
    match level {
        10 => "\u{1f41b}",        // bug
        20 => "\u{2139}\u{fe0f}", // information
        30 => "\u{26a0}\u{fe0f}", // warning
        40 => "\u{274c}",         // cross mark
        _ => "\u{1f198}",         // SOS
    }
}

/// The most text a message may have, in UTF-16 code units once its HTML
/// is parsed (the Bot API refuses more: "message is too long").
const TEXT_MAX: usize = 4096;

/// What ends a text cut to [`TEXT_MAX`].
const CUT: &str = "\n\u{2026} (cut to Telegram's 4096 characters)";

fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// The longest start of `s` within `max` UTF-16 code units.
fn within(s: &str, max: usize) -> &str {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        used += c.len_utf16();
        if used > max {
            return &s[..i];
        }
    }
    s
}

/// The text message of an event (Telegram's HTML subset), the message
/// (then the subject) cut so the whole fits in [`TEXT_MAX`], with [`CUT`]
/// saying so: a long message is delivered cut rather than refused on
/// every try.
fn text(e: &Event) -> String {
    let head = format!("{} ", emoji(e.level));
    let (mut subject, mut msg) = (e.formatted_subject.as_str(), e.msg.as_str());
    let mut end = "";
    let whole =
        utf16_len(&head) + utf16_len(subject) + utf16_len(msg) + usize::from(!msg.is_empty());
    if whole > TEXT_MAX {
        end = CUT;
        let room = TEXT_MAX - utf16_len(&head) - utf16_len(CUT);
        subject = within(subject, room);
        msg = within(msg, (room - utf16_len(subject)).saturating_sub(1));
    }
    let mut t = format!("{head}<b>{}</b>", escape(subject));
    if !msg.is_empty() {
        t.push('\n');
        t.push_str(&escape(msg));
    }
    t.push_str(&escape(end));
    t
}

/// The Bot API method and form field that send this media.
fn media_method(media: &[u8]) -> (&'static str, &'static str, &'static str) {
    match infer::get(media).map(|k| k.mime_type()) {
        Some(m @ ("image/jpeg" | "image/png" | "image/webp")) => ("sendPhoto", "photo", m),
        Some("image/gif") => ("sendAnimation", "animation", "image/gif"),
        Some(m @ "video/mp4") => ("sendVideo", "video", m),
        Some(m) => ("sendDocument", "document", m),
        None => ("sendDocument", "document", "application/octet-stream"),
    }
}

impl Telegram {
    /// Where `chat`'s events go: the supergroup it became, if it did.
    fn chat_now(&self, chat: i64) -> i64 {
        self.moved
            .lock()
            .ok()
            .and_then(|mut m| m.get(&chat).copied())
            .unwrap_or(chat)
    }

    /// Makes the call `call` makes for `chat` (where its events go now);
    /// when the Bot API answers that the group became a supergroup, makes
    /// it again there and remembers the move for the events after. A
    /// group's endpoints keep working when it is upgraded (as Telegram
    /// does to a group given admins or many members), with a warning
    /// that says how to give them the supergroup's own code.
    async fn in_chat<F, A>(&self, chat: i64, host: &Host, call: F) -> Result<Value, PluginError>
    where
        F: Fn(i64) -> A,
        A: Future<Output = Result<Value, Refusal>>,
    {
        let now = self.chat_now(chat);
        match call(now).await {
            Err(Refusal::Moved(to, _)) => {
                if let Ok(mut m) = self.moved.lock() {
                    m.insert(chat, to);
                }
                let _ = host
                    .log(
                        "warning",
                        &format!(
                            "the Telegram group {now} became the supergroup {to}: its events \
                             go there now; send /start in it for a code to give its endpoints"
                        ),
                    )
                    .await;
                call(to).await.map_err(PluginError::from)
            }
            r => r.map_err(PluginError::from),
        }
    }

    fn bot(&self) -> Result<Arc<Bot>, PluginError> {
        self.bot
            .read()
            .ok()
            .and_then(|b| b.clone())
            .ok_or_else(|| PluginError::rejected("the telegram plugin has no token configured"))
    }
}

fn ok() -> HttpResponse {
    HttpResponse::default()
}

#[roboger_plugin_sdk::async_trait]
impl Plugin for Telegram {
    fn info(&self) -> Info {
        Info {
            name: "telegram",
            version: env!("CARGO_PKG_VERSION"),
            description: "Telegram bot plugin",
            url: None,
            http: true,
            config_schema: Some(include_str!("../../../schema/plugins/telegram.schema.json")),
            plugin_config_schema: Some(include_str!(
                "../../../schema/plugins/telegram.plugin.schema.json"
            )),
        }
    }

    async fn validate_plugin_config(
        &self,
        config: &Value,
        _host: &Host,
    ) -> Result<(), PluginError> {
        schema::check(PluginConfigSchema::iter_errors(config))?;
        roboger_plugin_sdk::http::check_config_url(config, "api-url")
    }

    async fn load(&self, config: &Value, host: &Host) -> Result<(), PluginError> {
        let Some(token) = config.get("token").and_then(Value::as_str) else {
            host.log(
                "warning",
                "no token configured: the telegram plugin will refuse endpoints",
            )
            .await?;
            return Ok(());
        };
        let api = config
            .get("api-url")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_API);
        let bot = Arc::new(Bot::new(token, api)?);
        if let Ok(mut slot) = self.bot.write() {
            *slot = Some(bot.clone());
        }
        let timeout = host.call_budget().await;
        let Some(url) = host.get_url().await? else {
            host.log(
                "warning",
                "the server has no url: the bot's webhook (/start) is not registered",
            )
            .await?;
            return Ok(());
        };
        // Registered in the background, retried: a slow or failing Bot API
        // must not keep the plugin from loading and sending.
        let host = host.clone();
        tokio::spawn(async move {
            let hook = format!("{url}/plugin/telegram/{}", bot.secret);
            let mut pause = Duration::from_secs(1);
            loop {
                match bot.call("setWebhook", json!({"url": hook}), timeout).await {
                    Ok(_) => break,
                    Err(e) => {
                        let _ = host
                            .log(
                                "error",
                                &format!("cannot register the webhook (retrying): {e}"),
                            )
                            .await;
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(300));
            }
        });
        Ok(())
    }

    async fn validate_config(&self, config: &Value, _host: &Host) -> Result<(), PluginError> {
        schema::check(ConfigSchema::iter_errors(config))?;
        let bot = self.bot()?;
        if let Some(code) = config.get("chat_id").and_then(Value::as_str)
            && bot.decrypt(code).is_none()
        {
            return Err(PluginError::rejected(
                "chat_id: not a code this bot issued; send /start to the bot to get one",
            ));
        }
        Ok(())
    }

    async fn send(&self, e: Event, host: &Host) -> Result<(), PluginError> {
        let bot = self
            .bot()
            .map_err(|err| PluginError::failed(err.to_string()))?;
        let code = e.config_str("chat_id")?;
        let chat = bot
            .decrypt(code)
            .ok_or_else(|| PluginError::failed("chat_id: not a code this bot issued"))?;
        let timeout = host.call_budget().await;
        let silent = e.level <= 10;
        // The text is not sent again when a retry is only for the media.
        let delivery = format!("{}\n{code}", e.event_id);
        if !self.text_sent.get(&delivery) {
            let text = text(&e);
            // No link previews, as the original: Telegram's servers would
            // fetch every URL an event names.
            self.in_chat(chat, host, |chat| {
                bot.call(
                    "sendMessage",
                    json!({"chat_id": chat, "text": text, "parse_mode": "HTML",
                        "disable_notification": silent,
                        "link_preview_options": {"is_disabled": true}}),
                    timeout,
                )
            })
            .await?;
        }
        if let Some(media) = &e.media {
            self.text_sent.update(&delivery, |sent| *sent = true);
            let (method, field, mime) = media_method(media);
            let fname = e.media_fname.clone().unwrap_or_else(|| field.to_string());
            let upload = |chat: i64| {
                let part = reqwest::multipart::Part::bytes(media.clone())
                    .file_name(fname.clone())
                    .mime_str(mime);
                let bot = &bot;
                async move {
                    let form = reqwest::multipart::Form::new()
                        .text("chat_id", chat.to_string())
                        .text("disable_notification", silent.to_string())
                        .part(field, part.map_err(PluginError::failed)?);
                    let req = client()?
                        .post(format!("{}/{method}", bot.api))
                        .multipart(form)
                        .timeout(timeout);
                    answer(method, req).await
                }
            };
            let sent = self.in_chat(chat, host, upload).await;
            // Remembered only while the media may be tried again.
            if !matches!(sent, Err(PluginError::Failed(..) | PluginError::Later(..))) {
                self.text_sent.forget(&delivery);
            }
            sent?;
        }
        Ok(())
    }

    async fn http(&self, req: HttpRequest, host: &Host) -> Result<HttpResponse, PluginError> {
        let Ok(bot) = self.bot() else {
            return Ok(HttpResponse {
                status: 404,
                ..ok()
            });
        };
        let given = req.path.trim_start_matches('/');
        let same: bool = given.as_bytes().ct_eq(bot.secret.as_bytes()).into();
        if !same || req.method != "POST" {
            return Ok(HttpResponse {
                status: 404,
                ..ok()
            });
        }
        // Always 200 for a well-addressed update, so Telegram does not
        // resend one we cannot use.
        let Ok(update) = serde_json::from_slice::<Value>(&req.body) else {
            return Ok(ok());
        };
        let m = &update["message"];
        let chat = m["chat"]["id"].as_i64();
        let is_start = m["text"].as_str().is_some_and(|t| {
            t.split_whitespace()
                .next()
                .is_some_and(|w| w == "/start" || w.starts_with("/start@"))
        });
        if let (Some(chat), true) = (chat, is_start) {
            let timeout = host.call_budget().await;
            let reply = format!(
                "Your chat id for Roboger endpoints:\n<code>{}</code>",
                bot.encrypt(chat)?
            );
            if let Err(e) = bot
                .call(
                    "sendMessage",
                    json!({"chat_id": chat, "text": reply, "parse_mode": "HTML"}),
                    timeout,
                )
                .await
            {
                host.log("error", &format!("cannot answer /start: {e}"))
                    .await?;
            }
        }
        Ok(ok())
    }
}

fn main() -> std::process::ExitCode {
    run(Telegram {
        bot: RwLock::new(None),
        text_sent: Progress::default(),
        moved: Mutex::new(LruCache::new(MOVES)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_html_with_the_level_emoji() {
        let e = Event {
            formatted_subject: "WARNING a<b>".into(),
            msg: "x & y".into(),
            level: 30,
            ..Default::default()
        };
        assert_eq!(
            text(&e),
            "\u{26a0}\u{fe0f} <b>WARNING a&lt;b&gt;</b>\nx &amp; y"
        );
    }

    /// The text as Telegram counts it: its HTML parsed.
    fn visible(t: &str) -> String {
        t.replace("<b>", "")
            .replace("</b>", "")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    }

    #[test]
    fn a_text_past_telegrams_limit_is_cut_to_it_and_says_so() {
        let fits = Event {
            formatted_subject: "s".into(),
            msg: "&".repeat(TEXT_MAX - 5),
            level: 20,
            ..Default::default()
        };
        assert_eq!(utf16_len(&visible(&text(&fits))), TEXT_MAX);
        assert!(!text(&fits).contains("cut to"));
        for (subject, msg) in [
            ("s".to_string(), "&".repeat(TEXT_MAX)),
            ("s".to_string(), "\u{1f600}".repeat(TEXT_MAX)),
            ("<".repeat(2 * TEXT_MAX), "m".to_string()),
            ("<".repeat(2 * TEXT_MAX), String::new()),
        ] {
            let e = Event {
                formatted_subject: subject.clone(),
                msg: msg.clone(),
                level: 20,
                ..Default::default()
            };
            let t = text(&e);
            let shown = visible(&t);
            assert!(utf16_len(&shown) <= TEXT_MAX, "{}", utf16_len(&shown));
            assert!(utf16_len(&shown) > TEXT_MAX - 2, "{}", utf16_len(&shown));
            assert!(shown.ends_with(CUT), "{shown}");
            assert!(t.starts_with("\u{2139}\u{fe0f} <b>"), "{t}");
        }
    }
}
