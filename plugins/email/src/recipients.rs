//! One event mailed to each of an endpoint's recipients in an SMTP
//! transaction of its own, so that a mailbox the SMTP server refuses does
//! not keep the mail from the others, and what each recipient came to
//! decides the delivery's outcome: delivered when every one was mailed,
//! failed for good when the rest were refused for good, tried again when
//! any was refused for now or not reached. A retry mails only the
//! recipients not yet settled, as the SDK's [`Progress`] remembers them
//! until the outcome is final.

use std::collections::HashMap;

use lettre::Address;
use lettre::message::Mailboxes;
use roboger_plugin_sdk::progress::Progress;

/// The settled replies of a delivery's recipients.
pub type Settled = HashMap<Address, Reply>;

/// SMTP's replies about the sender's own login (530 authentication
/// required, 534 mechanism too weak, 535 credentials invalid, 538
/// encryption required): permanent replies, but the operator's to fix in
/// the plugin config, so the delivery is tried again meanwhile.
const LOGIN_REPLIES: [&str; 4] = ["530", "534", "535", "538"];

/// What one recipient came to.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Mailed,
    /// A permanent reply (5xx) about the message or the mailbox, such as
    /// 550 for an unknown mailbox or 554 for a message refused: sending
    /// it again would be refused again, and repeated sends refused as spam
    /// harm the sender's name.
    RefusedForGood(String),
    /// A transient reply (4xx): tried again.
    RefusedForNow(String),
    /// No reply about this mail: the connection, TLS or the login failed.
    /// Tried again.
    NotReached(String),
}

impl Reply {
    /// The reply a failed SMTP transaction stands for.
    pub fn of(err: &lettre::transport::smtp::Error) -> Reply {
        let code = err.status().map(|c| c.to_string());
        let login = code.as_deref().is_some_and(|c| LOGIN_REPLIES.contains(&c));
        if err.is_permanent() && !login {
            Reply::RefusedForGood(err.to_string())
        } else if err.is_transient() {
            Reply::RefusedForNow(err.to_string())
        } else if err.to_string().contains("certificate") {
            Reply::NotReached(format!(
                "{err} (to trust the CA that signed the SMTP server's certificate, \
                 name it with smtp.ca-file in the plugin config)"
            ))
        } else {
            Reply::NotReached(err.to_string())
        }
    }

    /// Whether this reply is the recipient's last word for this event.
    fn settled(&self) -> bool {
        matches!(self, Reply::Mailed | Reply::RefusedForGood(_))
    }

    fn text(&self) -> &str {
        match self {
            Reply::Mailed => "mailed",
            Reply::RefusedForGood(t) | Reply::RefusedForNow(t) | Reply::NotReached(t) => t,
        }
    }
}

/// The recipients in `rcpt` (a comma-separated list of mailboxes), each
/// address once, in their order.
pub fn parse(rcpt: &str) -> Result<Mailboxes, String> {
    let all: Mailboxes = rcpt.parse().map_err(|e| format!("rcpt: {e}"))?;
    let mut seen = Vec::new();
    let mut once = Mailboxes::new();
    for m in all {
        if !seen.contains(&m.email) {
            seen.push(m.email.clone());
            once.push(m);
        }
    }
    Ok(once)
}

/// A delivery's outcome from what each recipient came to.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Delivered,
    /// Final: some recipients were refused for good, none for now.
    Refused(String),
    /// Tried again: some recipients were refused for now or not reached.
    Failed(String),
}

/// How many addresses the outcome's text names for each reply.
const NAMED: usize = 10;

/// The outcome of `replies` (every recipient's, in the list's order),
/// its text naming which recipients came to what, those alike together,
/// the mailed last, and at most [`NAMED`] addresses for each:
/// `smtp: c@z: permanent error (550): ...; a@x, b@y and 3 more: mailed`.
pub fn outcome(replies: &[(Address, Reply)]) -> Outcome {
    if replies.iter().all(|(_, r)| *r == Reply::Mailed) {
        return Outcome::Delivered;
    }
    let mut groups: Vec<(&Reply, Vec<&Address>)> = Vec::new();
    for (a, r) in replies {
        match groups.iter_mut().find(|(g, _)| g.text() == r.text()) {
            Some((_, to)) => to.push(a),
            None => groups.push((r, vec![a])),
        }
    }
    groups.sort_by_key(|(r, _)| **r == Reply::Mailed);
    let text = groups
        .iter()
        .map(|(r, to)| {
            let named: Vec<String> = to.iter().take(NAMED).map(ToString::to_string).collect();
            let more = match to.len().saturating_sub(NAMED) {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            format!("{}{more}: {}", named.join(", "), r.text())
        })
        .collect::<Vec<_>>()
        .join("; ");
    let text = format!("smtp: {text}");
    if replies.iter().all(|(_, r)| r.settled()) {
        Outcome::Refused(text)
    } else {
        Outcome::Failed(text)
    }
}

/// Remembers `reply` for `to` when it is the recipient's last word.
pub fn remember(progress: &Progress<Settled>, delivery: &str, to: &Address, reply: &Reply) {
    if reply.settled() {
        progress.update(delivery, |s| {
            s.insert(to.clone(), reply.clone());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Address {
        s.parse().unwrap()
    }

    #[test]
    fn the_outcome_names_who_came_to_what() {
        let good = Reply::RefusedForGood("permanent error (550): no such mailbox".into());
        let now = Reply::RefusedForNow("transient error (452): over quota".into());
        assert_eq!(
            outcome(&[(a("o@x"), Reply::Mailed), (a("p@x"), Reply::Mailed)]),
            Outcome::Delivered
        );
        assert_eq!(
            outcome(&[
                (a("o@x"), Reply::Mailed),
                (a("u@x"), good.clone()),
                (a("p@x"), Reply::Mailed),
                (a("v@x"), good.clone()),
            ]),
            Outcome::Refused(
                "smtp: u@x, v@x: permanent error (550): no such mailbox; o@x, p@x: mailed".into()
            )
        );
        let many: Vec<(Address, Reply)> = (0..25)
            .map(|i| (a(&format!("m{i}@x")), Reply::Mailed))
            .chain([(a("u@x"), good.clone())])
            .collect();
        assert_eq!(
            outcome(&many),
            Outcome::Refused(format!(
                "smtp: u@x: permanent error (550): no such mailbox; {} and 15 more: mailed",
                (0..10)
                    .map(|i| format!("m{i}@x"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        );
        assert_eq!(
            outcome(&[(a("u@x"), good), (a("b@x"), now)]),
            Outcome::Failed(
                "smtp: u@x: permanent error (550): no such mailbox; \
                 b@x: transient error (452): over quota"
                    .into()
            )
        );
    }

    #[test]
    fn recipients_are_listed_once() {
        let to: Vec<String> = parse("o@x, p@x, o@x, P <p@x>")
            .unwrap()
            .into_iter()
            .map(|m| m.email.to_string())
            .collect();
        assert_eq!(to, ["o@x", "p@x"]);
        assert!(parse("o@x, not an address").is_err());
    }

    #[test]
    fn only_settled_replies_are_remembered() {
        let p = Progress::default();
        remember(&p, "e1", &a("o@x"), &Reply::Mailed);
        remember(&p, "e1", &a("b@x"), &Reply::RefusedForNow("later".into()));
        remember(&p, "e1", &a("c@x"), &Reply::NotReached("refused".into()));
        assert_eq!(p.get("e1"), HashMap::from([(a("o@x"), Reply::Mailed)]));
    }
}
