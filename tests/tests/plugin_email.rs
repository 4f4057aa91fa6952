//! The email plugin through the real server, against a real SMTP server
//! on loopback (aiosmtpd, installed by `tests/run`): headers, body and
//! attachment as delivered, with and without SMTP AUTH.

use base64::Engine;
use roboger_tests::{
    Server, ServerOptions, SmtpSink, SmtpTls, TestCa, Value, assert_status, json, plugin_bin,
    venv_python,
};

const PNG: &[u8] =
    b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

async fn server(smtp: &str) -> Server {
    Server::start_with(ServerOptions {
        yaml: "delivery:\n  retry-base: 0.05\n  max-attempts: 2\n".into(),
        plugins_yaml: format!(
            "- name: email\n  command: {}\n  config:\n    default-location: example.org\n    smtp: {smtp}\n",
            plugin_bin("email").display()
        ),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn mails_headers_body_and_attachment_as_the_original() {
    let Some(python) = venv_python("aiosmtpd") else {
        return;
    };
    let smtp = SmtpSink::start(&python, None);
    let s = server(&format!("{{host: 127.0.0.1, port: {}}}", smtp.port)).await;
    let (id, a) = s.new_addr().await;

    let r = s
        .try_endpoint(id, "email", json!({"rcp": "ops@example.com"}))
        .await;
    assert_status!(r, 400);
    assert!(r.text.contains("rcp"), "{}", r.text);
    let r = s.try_endpoint(id, "email", json!({"rcpt": 1})).await;
    assert_status!(r, 400);
    assert!(r.text.contains("rcpt"), "{}", r.text);
    let r = s
        .try_endpoint(id, "email", json!({"rcpt": "not an address"}))
        .await;
    assert_status!(r, 400);
    assert!(
        r.text
            .contains(r#"rcpt: "not an address" is not an email address"#),
        "{}",
        r.text
    );
    s.endpoint(id, "email", json!({"rcpt": "ops@example.com"}))
        .await;

    let media = base64::engine::general_purpose::STANDARD.encode(PNG);
    let r = s
        .push(
            json!({"addr": a, "sender": "bot", "location": "lab", "level": "warning",
            "subject": "disk", "msg": "sda1 is 99% full\nsecond line", "media": media}),
        )
        .await;
    assert_status!(r, 202);
    let m = &smtp.wait(1).await[0];
    let event = s.wait_settled(id).await;
    assert_eq!(
        m["headers"]["Message-ID"],
        format!("<{}@example.org>", event["id"].as_str().unwrap_or_default()),
        "{event}"
    );
    assert_eq!(m["mail_from"], "bot@lab");
    assert_eq!(m["rcpt_tos"], json!(["ops@example.com"]));
    assert_eq!(m["headers"]["From"], "bot@lab");
    assert_eq!(m["headers"]["To"], "ops@example.com");
    assert_eq!(m["headers"]["Subject"], "WARNING bot@lab: disk");
    assert_eq!(
        m["text"].as_str().map(|t| t.replace("\r\n", "\n")),
        Some("sda1 is 99% full\nsecond line".to_string())
    );
    let att = &m["attachments"][0];
    assert_eq!(att["filename"], "attachment.png");
    assert_eq!(att["content_type"], "image/png");
    assert_eq!(att["data"], media.as_str());

    // No sender: roboger at the default location; a named file is kept.
    let r = s
        .push(json!({"addr": a, "msg": "hi", "media": media, "media_fname": "dir/shot.png"}))
        .await;
    assert_status!(r, 202);
    let m = &smtp.wait(2).await[1];
    assert_eq!(m["headers"]["From"], "roboger@example.org");
    assert_eq!(m["headers"]["Subject"], "INFO");
    assert_eq!(m["attachments"][0]["filename"], "shot.png");
    assert_eq!(m["authenticated"], false);
    assert_eq!(m["tls"], false);

    // A sender with a line break (which made lettre panic) is a display
    // name with a space for it, and no header of its own.
    let r = s
        .push(json!({"addr": a, "sender": "disk\r\nBcc: x@example.com", "msg": "m"}))
        .await;
    assert_status!(r, 202);
    let m = &smtp.wait(3).await[2];
    // (Python's parser folds the two spaces into one.)
    assert_eq!(
        m["headers"]["From"],
        "\"disk Bcc: x@example.com\" <roboger@example.org>"
    );
    assert_eq!(m["rcpt_tos"], json!(["ops@example.com"]));
    assert_eq!(m["headers"].get("Bcc"), None);
}

#[tokio::test]
async fn logs_in_and_a_wrong_password_is_a_failed_delivery() {
    let Some(python) = venv_python("aiosmtpd") else {
        return;
    };
    let smtp = SmtpSink::start(&python, Some(("robot", "s3cret")));
    let good = server(&format!(
        "{{host: 127.0.0.1, port: {}, login: robot, password: s3cret}}",
        smtp.port
    ))
    .await;
    let (id, a) = good.new_addr().await;
    good.endpoint(id, "email", json!({"rcpt": "ops@example.com"}))
        .await;
    assert_status!(
        good.push(json!({"addr": a, "sender": "a b", "msg": "m"}))
            .await,
        202
    );
    let m = &smtp.wait(1).await[0];
    assert_eq!(m["authenticated"], true);
    assert_eq!(m["headers"]["From"], "a b <roboger@example.org>");
    assert_eq!(
        good.wait_settled(id).await["deliveries"][0]["state"],
        "delivered"
    );

    let bad = server(&format!(
        "{{host: 127.0.0.1, port: {}, login: robot, password: wrong}}",
        smtp.port
    ))
    .await;
    let (id, a) = bad.new_addr().await;
    bad.endpoint(id, "email", json!({"rcpt": "ops@example.com"}))
        .await;
    assert_status!(bad.push(json!({"addr": a, "msg": "m"})).await, 202);
    let (state, attempts, why) = bad.settled_delivery(id).await;
    assert_eq!((state.as_str(), attempts), ("failed", 2), "{why}");
    assert!(why.contains("smtp"), "{why}");
}

/// A mailbox the SMTP server refuses for good (550) fails the delivery at
/// once, the server's reply in its error; one refused for now (452), or a
/// login refused (535, above), is tried again. In a list, each recipient
/// is mailed on its own: one refused does not keep the mail from the
/// others, and a retry mails only those not yet mailed.
#[tokio::test]
async fn a_refused_mailbox_is_not_mailed_again_nor_keeps_the_mail_from_others() {
    let Some(python) = venv_python("aiosmtpd") else {
        return;
    };
    let smtp = SmtpSink::start(&python, None);
    let s = server(&format!("{{host: 127.0.0.1, port: {}}}", smtp.port)).await;
    for (rcpt, state, attempts, reply) in [
        ("unknown@example.com", "failed", 1, "no such mailbox"),
        ("busy@example.com", "failed", 2, "over quota"),
    ] {
        let (id, a) = s.new_addr().await;
        s.endpoint(id, "email", json!({ "rcpt": rcpt })).await;
        assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
        let (got, tries, why) = s.settled_delivery(id).await;
        assert_eq!((got.as_str(), tries), (state, attempts), "{rcpt}: {why}");
        assert!(why.contains(reply), "{rcpt}: {why}");
    }
    // And a mailbox that exists is mailed.
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "email", json!({"rcpt": "ops@example.com"}))
        .await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    assert_eq!(
        smtp.wait(1).await[0]["rcpt_tos"],
        json!(["ops@example.com"])
    );

    // Lists: the mailboxes that exist are mailed, once each, whatever
    // the others came to; the delivery's error says who came to what.
    for (rcpt, state, attempts, why_parts) in [
        (
            "unknown@example.com, a1@example.com",
            "failed",
            1,
            &[
                "a1@example.com: mailed",
                "unknown@example.com: permanent error (550)",
            ][..],
        ),
        (
            "a2@example.com, busy@example.com",
            "failed",
            2,
            &[
                "a2@example.com: mailed",
                "busy@example.com: transient error (452)",
            ],
        ),
        (
            "a3@example.com, later@example.com, a3@example.com",
            "delivered",
            2,
            &[],
        ),
    ] {
        let (id, a) = s.new_addr().await;
        s.endpoint(id, "email", json!({ "rcpt": rcpt })).await;
        assert_status!(s.push(json!({"addr": a, "msg": rcpt})).await, 202);
        let (got, tries, why) = s.settled_delivery(id).await;
        assert_eq!((got.as_str(), tries), (state, attempts), "{rcpt}: {why}");
        for part in why_parts {
            assert!(why.contains(part), "{rcpt}: {why}");
        }
    }
    let mails = smtp.wait(5).await;
    let to: Vec<&Value> = mails[1..].iter().map(|m| &m["rcpt_tos"]).collect();
    assert_eq!(
        to,
        [
            &json!(["a1@example.com"]),
            &json!(["a2@example.com"]),
            &json!(["a3@example.com"]),
            &json!(["later@example.com"]),
        ],
        "{mails:#?}"
    );
    // Each one's headers name the whole list, and it is one message:
    // one Message-ID, whichever try mailed it.
    assert_eq!(
        mails[3]["headers"]["Message-ID"],
        mails[4]["headers"]["Message-ID"]
    );
    assert_eq!(
        mails[4]["headers"]["To"],
        "a3@example.com, later@example.com"
    );
    assert_eq!(
        mails[4]["text"].as_str().map(str::trim_end),
        Some("a3@example.com, later@example.com, a3@example.com")
    );
}

/// An SMTP server whose certificate an internal CA signed (STARTTLS or
/// TLS from the first byte): not trusted by default, the delivery retried
/// with an error that says what to do; trusted with `smtp.ca-file`; taken
/// as it is with `verify-certificate: false`, as the original took every
/// certificate.
#[tokio::test]
async fn an_smtp_server_with_a_private_ca_is_trusted_when_told() {
    let Some(python) = venv_python("aiosmtpd") else {
        return;
    };
    let ca = TestCa::new();
    let starttls = SmtpSink::start_tls(&python, &ca, SmtpTls::StartTls);
    let implicit = SmtpSink::start_tls(&python, &ca, SmtpTls::Implicit);
    let options = |smtp: String| ServerOptions {
        yaml: "delivery:\n  retry-base: 0.05\n  max-attempts: 2\n".into(),
        plugins_yaml: format!(
            "- name: email\n  command: {}\n  config:\n    default-location: example.org\n    smtp: {smtp}\n",
            plugin_bin("email").display()
        ),
        ..Default::default()
    };
    let servers = Server::start_many(vec![
        options(format!(
            "{{host: 127.0.0.1, port: {}, tls: true}}",
            starttls.port
        )),
        options(format!(
            "{{host: 127.0.0.1, port: {}, tls: true, ca-file: '{}'}}",
            starttls.port,
            ca.ca_file().display()
        )),
        options(format!(
            "{{host: 127.0.0.1, port: {}, ssl: true, ca-file: '{}'}}",
            implicit.port,
            ca.ca_file().display()
        )),
        options(format!(
            "{{host: 127.0.0.1, port: {}, ssl: true, verify-certificate: false}}",
            implicit.port
        )),
    ]);
    let mut settled = Vec::new();
    for s in &servers {
        let (id, a) = s.new_addr().await;
        s.endpoint(id, "email", json!({"rcpt": "ops@example.com"}))
            .await;
        assert_status!(s.push(json!({"addr": a, "msg": "over TLS"})).await, 202);
        settled.push(s.settled_delivery(id).await);
    }
    let (state, attempts, why) = &settled[0];
    assert_eq!((state.as_str(), *attempts), ("failed", 2), "{why}");
    assert!(
        why.contains("certificate") && why.contains("smtp.ca-file"),
        "{why}"
    );
    for (state, attempts, why) in &settled[1..] {
        assert_eq!((state.as_str(), *attempts), ("delivered", 1), "{why}");
    }
    for (sink, n) in [(&starttls, 1), (&implicit, 2)] {
        let mails = sink.wait(n).await;
        assert_eq!(mails.len(), n);
        for m in mails {
            assert_eq!(m["tls"], true, "{m}");
            assert_eq!(m["text"].as_str().map(str::trim_end), Some("over TLS"));
        }
    }
}
