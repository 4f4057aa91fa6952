//! The email plugin: mails each event through an SMTP server (pooled,
//! plain, STARTTLS or TLS, with or without login), as the original did:
//! From = the sender (`roboger` when absent) plus `@location` when it has
//! no `@`; Subject = the formatted subject; the message as the text body;
//! the media as an attachment, its name and type guessed when absent.

mod recipients;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use lettre::address::Envelope;
use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use recipients::{Outcome, Reply, Settled};
use roboger_plugin_sdk::progress::Progress;
use roboger_plugin_sdk::schema;
use roboger_plugin_sdk::{Event, Host, Info, Plugin, PluginError, run};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;

/// The endpoint config's schema, compiled when the plugin is built.
#[jsonschema::validator(path = "../../schema/plugins/email.schema.json")]
struct ConfigSchema;
/// The plugin config's schema, compiled when the plugin is built.
#[jsonschema::validator(path = "../../schema/plugins/email.plugin.schema.json")]
struct PluginConfigSchema;

/// The SMTP transport and mail domain from the plugin config.
struct Setup {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    default_location: String,
    /// `roboger@{default_location}`: From when the sender makes no address.
    fallback: Address,
}

struct Email {
    setup: RwLock<Option<Arc<Setup>>>,
    /// What the recipients of retried deliveries came to.
    progress: Progress<Settled>,
}

/// How many of an event's recipients are mailed at once.
const AT_ONCE: usize = 4;

fn rejected(e: impl std::fmt::Display) -> PluginError {
    PluginError::rejected(e.to_string())
}

/// Builds the transport for a plugin config already checked by the schema.
fn setup(config: &Value, timeout: f64) -> Result<Setup, PluginError> {
    let smtp = config.get("smtp").cloned().unwrap_or(Value::Null);
    let text = |k: &str| smtp.get(k).and_then(Value::as_str);
    let flag = |k: &str| smtp.get(k).and_then(Value::as_bool).unwrap_or(false);
    let host = text("host").unwrap_or("localhost");
    let (ssl, tls) = (flag("ssl"), flag("tls"));
    let default_port = if ssl {
        465
    } else if tls {
        587
    } else {
        25
    };
    let port = smtp
        .get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(default_port);
    // TLS through rustls with the ring provider (no cmake needed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .timeout(Some(Duration::from_secs_f64(timeout)));
    let verify = smtp.get("verify-certificate").and_then(Value::as_bool);
    let ca_file = text("ca-file");
    if !(ssl || tls) && (verify.is_some() || ca_file.is_some()) {
        return Err(rejected(
            "smtp: ca-file and verify-certificate are for TLS: set tls (STARTTLS) or ssl",
        ));
    }
    if ssl || tls {
        let mut params = TlsParameters::builder(host.to_string());
        if let Some(path) = ca_file {
            params = params.add_root_certificate(ca_certificates(path)?);
        }
        // The original never checked the certificate; here it takes
        // saying so.
        if verify == Some(false) {
            params = params.dangerous_accept_invalid_certs(true);
        }
        let params = params.build().map_err(rejected)?;
        b = b.tls(if ssl {
            Tls::Wrapper(params)
        } else {
            Tls::Required(params)
        });
    }
    if let Some(login) = text("login") {
        b = b.credentials(Credentials::new(
            login.to_string(),
            text("password").unwrap_or("").to_string(),
        ));
    }
    let default_location = config
        .get("default-location")
        .and_then(Value::as_str)
        .unwrap_or("localhost");
    let fallback = Address::new("roboger", default_location)
        .map_err(|e| PluginError::rejected(format!("default-location: {e}")))?;
    Ok(Setup {
        transport: b.build(),
        default_location: default_location.to_string(),
        fallback,
    })
}

/// The certificates in the PEM file at `path`, trusted besides the
/// system's to sign the SMTP server's (an internal CA, or the relay's own
/// self-signed certificate).
fn ca_certificates(path: &str) -> Result<Certificate, PluginError> {
    let pem = std::fs::read(path)
        .map_err(|e| rejected(format!("smtp.ca-file: cannot read {path}: {e}")))?;
    let found = CertificateDer::pem_slice_iter(&pem).count();
    let certs = Certificate::from_pem(&pem)
        .ok()
        .filter(|_| found > 0)
        .ok_or_else(|| rejected(format!("smtp.ca-file: {path} holds no PEM certificate")))?;
    Ok(certs)
}

/// The From mailbox: `sender@location` when that is an address, else the
/// sender as the display name of `fallback` (`roboger@default-location`).
fn from(
    sender: Option<&str>,
    location: Option<&str>,
    default_location: &str,
    fallback: &Address,
) -> Mailbox {
    let sender = sender.filter(|s| !s.is_empty()).unwrap_or("roboger");
    let domain = location
        .filter(|l| !l.is_empty())
        .unwrap_or(default_location);
    let full = if sender.contains('@') {
        sender.to_string()
    } else {
        format!("{sender}@{domain}")
    };
    match full.parse::<Address>() {
        Ok(a) => Mailbox::new(None, a),
        // A line break in a display name makes lettre panic as it writes
        // the header (other control characters are refused or kept as
        // they are): each becomes a space.
        Err(_) => {
            let name = sender
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            Mailbox::new(Some(name), fallback.clone())
        }
    }
}

/// The attachment's file name and content type.
fn attachment_kind(
    media: &[u8],
    fname: Option<&str>,
) -> Result<(String, ContentType), PluginError> {
    let kind = infer::get(media);
    let mime = kind
        .map(|k| k.mime_type())
        .unwrap_or("application/octet-stream");
    let name = match fname.filter(|f| !f.is_empty()) {
        Some(f) => f.to_string(),
        None => format!(
            "attachment.{}",
            kind.map(|k| k.extension()).unwrap_or("bin")
        ),
    };
    let ct = ContentType::parse(mime).map_err(PluginError::failed)?;
    Ok((name, ct))
}

fn message(e: &Event, to: Mailboxes, s: &Setup) -> Result<Message, PluginError> {
    let mut b = Message::builder()
        .from(from(
            e.sender.as_deref(),
            e.location.as_deref(),
            &s.default_location,
            &s.fallback,
        ))
        .subject(e.formatted_subject.clone())
        // The same on every try and for every recipient: mail clients
        // take a message sent again for the one they have, and relays
        // that refuse mail without one (as Gmail does) take it.
        .message_id(Some(format!("<{}@{}>", e.event_id, s.default_location)));
    for m in to {
        b = b.to(m);
    }
    let text = SinglePart::plain(e.msg.clone());
    let m = match &e.media {
        Some(media) => {
            let (name, ct) = attachment_kind(media, e.media_fname.as_deref())?;
            b.multipart(
                MultiPart::mixed()
                    .singlepart(text)
                    .singlepart(Attachment::new(name).body(media.clone(), ct)),
            )
        }
        None => b.singlepart(text),
    };
    m.map_err(PluginError::failed)
}

#[roboger_plugin_sdk::async_trait]
impl Plugin for Email {
    fn info(&self) -> Info {
        Info {
            name: "email",
            version: env!("CARGO_PKG_VERSION"),
            description: "email sender plugin",
            url: None,
            http: false,
            config_schema: Some(include_str!("../../../schema/plugins/email.schema.json")),
            plugin_config_schema: Some(include_str!(
                "../../../schema/plugins/email.plugin.schema.json"
            )),
        }
    }

    async fn validate_plugin_config(
        &self,
        config: &Value,
        _host: &Host,
    ) -> Result<(), PluginError> {
        schema::check(PluginConfigSchema::iter_errors(config))?;
        setup(config, 5.0).map(drop)
    }

    async fn load(&self, config: &Value, host: &Host) -> Result<(), PluginError> {
        let timeout = host.call_budget().await.as_secs_f64();
        let s = Arc::new(setup(config, timeout)?);
        if let Ok(mut slot) = self.setup.write() {
            *slot = Some(s);
        }
        Ok(())
    }

    async fn validate_config(&self, config: &Value, _host: &Host) -> Result<(), PluginError> {
        schema::check(ConfigSchema::iter_errors(config))?;
        if let Some(r) = config.get("rcpt").and_then(Value::as_str) {
            r.parse::<Mailboxes>().map_err(|e| {
                PluginError::rejected(format!(
                    "rcpt: {r:?} is not an email address or a comma-separated list of them ({})",
                    e.to_string().to_lowercase()
                ))
            })?;
        }
        Ok(())
    }

    async fn send(&self, e: Event, _host: &Host) -> Result<(), PluginError> {
        let rcpt = e.config_str("rcpt")?;
        let to = recipients::parse(rcpt).map_err(PluginError::failed)?;
        // The server always calls `load` (with `{}` when unconfigured)
        // before any `send`.
        let s = self
            .setup
            .read()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| PluginError::failed("the plugin is not loaded"))?;
        let m = message(&e, to.clone(), &s)?;
        let from = m.envelope().from().cloned();
        let mail = m.formatted();
        let delivery = format!("{}\n{rcpt}", e.event_id);
        let settled = self.progress.get(&delivery);
        // Each recipient not yet settled in a transaction of its own, a
        // few at a time over the transport's pool, their replies in the
        // list's order.
        let replies: Vec<(Address, Reply)> = stream::iter(to.into_iter().map(|m| m.email))
            .map(|to| {
                let (settled, delivery, from, mail, s) = (&settled, &delivery, &from, &mail, &s);
                async move {
                    if let Some(r) = settled.get(&to) {
                        return (to, r.clone());
                    }
                    let reply = match Envelope::new(from.clone(), vec![to.clone()]) {
                        Ok(envelope) => match s.transport.send_raw(&envelope, mail).await {
                            Ok(_) => Reply::Mailed,
                            Err(err) => Reply::of(&err),
                        },
                        Err(err) => Reply::RefusedForGood(err.to_string()),
                    };
                    recipients::remember(&self.progress, delivery, &to, &reply);
                    (to, reply)
                }
            })
            .buffered(AT_ONCE)
            .collect()
            .await;
        match recipients::outcome(&replies) {
            Outcome::Delivered => {
                self.progress.forget(&delivery);
                tracing::debug!(event = %e.event_id, %rcpt, "mailed");
                Ok(())
            }
            Outcome::Refused(why) => {
                self.progress.forget(&delivery);
                Err(PluginError::rejected(why))
            }
            Outcome::Failed(why) => Err(PluginError::failed(why)),
        }
    }
}

fn main() -> std::process::ExitCode {
    run(Email {
        setup: RwLock::new(None),
        progress: Progress::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_is_sender_at_location_or_a_display_name() {
        let lab = Address::new("roboger", "lab").unwrap();
        let from = |s, l| from(s, l, "lab", &lab).to_string();
        assert_eq!(from(None, None), "roboger@lab");
        assert_eq!(from(Some("bot"), Some("site")), "bot@site");
        assert_eq!(from(Some("a@b.c"), Some("site")), "a@b.c");
        assert_eq!(from(Some("disk bot"), None), "disk bot <roboger@lab>");
        assert_eq!(from(Some("bot"), Some("my lab")), "bot <roboger@lab>");
        assert_eq!(
            from(Some("bot\r\nBcc: x@y\0"), None),
            "\"bot  Bcc: x@y\" <roboger@lab>"
        );
    }

    #[test]
    fn a_sender_with_control_characters_makes_a_message() {
        let lab = Address::new("roboger", "lab").unwrap();
        for sender in ["bot\r\nBcc: x@y", "a\u{0}b", "a\u{7f}\tb", "x\ny@z"] {
            let m = Message::builder()
                .from(from(Some(sender), Some("site"), "lab", &lab))
                .to(Mailbox::new(None, lab.clone()))
                .subject("s")
                .body(String::from("b"))
                .map(|m| String::from_utf8_lossy(&m.formatted()).into_owned());
            let text = m.unwrap_or_else(|e| panic!("{sender:?}: {e}"));
            assert!(!text.contains("\nBcc"), "{sender:?}: {text}");
        }
    }

    #[test]
    fn the_tls_options_are_checked_when_the_config_is() {
        let why = |smtp: Value| match setup(&serde_json::json!({ "smtp": smtp }), 5.0) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert_eq!(
            why(serde_json::json!({"host": "h", "verify-certificate": false})),
            "smtp: ca-file and verify-certificate are for TLS: set tls (STARTTLS) or ssl"
        );
        let missing = why(serde_json::json!({"host": "h", "tls": true, "ca-file": "/nonexistent"}));
        assert!(
            missing.starts_with("smtp.ca-file: cannot read /nonexistent: "),
            "{missing}"
        );
        let dir = std::env::temp_dir().join(format!("email-ca-{}", std::process::id()));
        std::fs::write(&dir, "not a certificate").unwrap();
        let path = dir.display().to_string();
        assert_eq!(
            why(serde_json::json!({"host": "h", "ssl": true, "ca-file": path})),
            format!("smtp.ca-file: {path} holds no PEM certificate")
        );
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn attachment_names_are_guessed_from_content() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(attachment_kind(png, None).unwrap().0, "attachment.png");
        assert_eq!(attachment_kind(b"xx", Some("a.txt")).unwrap().0, "a.txt");
    }
}
