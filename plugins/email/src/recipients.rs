//! One event mailed to each of an endpoint's recipients in an SMTP
//! transaction of its own, so that a mailbox the SMTP server refuses does
//! not keep the mail from the others, and what each recipient came to
//! decides the delivery's outcome: delivered when every one was mailed,
//! failed for good when the rest were refused for good, tried again when
//! any was refused for now or not reached. A retry mails only the
//! recipients not yet settled: what each came to is remembered in this
//! process until the outcome is final, for at most [`REMEMBERED`]
//! deliveries. A retry that runs on another node, or after the plugin was
//! restarted, mails every recipient again: at least once, as every
//! delivery.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use lettre::Address;
use lettre::message::Mailboxes;

/// How many deliveries part-way through are remembered; past it the
/// oldest is forgotten (and its recipients mailed again if retried).
pub const REMEMBERED: usize = 10_000;

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

/// The outcome of `replies` (every recipient's, in the list's order),
/// its text naming which recipients came to what, those alike together:
/// `smtp: a@x, b@y: mailed; c@z: permanent error (550): ...`.
pub fn outcome(replies: &[(Address, Reply)]) -> Outcome {
    if replies.iter().all(|(_, r)| *r == Reply::Mailed) {
        return Outcome::Delivered;
    }
    let mut groups: Vec<(&str, Vec<&Address>)> = Vec::new();
    for (a, r) in replies {
        match groups.iter_mut().find(|(t, _)| *t == r.text()) {
            Some((_, to)) => to.push(a),
            None => groups.push((r.text(), vec![a])),
        }
    }
    let text = groups
        .iter()
        .map(|(t, to)| {
            let to: Vec<String> = to.iter().map(ToString::to_string).collect();
            format!("{}: {t}", to.join(", "))
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

/// What the recipients of deliveries still part-way through came to,
/// by delivery (the event id and the endpoint's `rcpt`).
#[derive(Default)]
pub struct Progress {
    inner: Mutex<Remembered>,
}

#[derive(Default)]
struct Remembered {
    next: u64,
    /// Each delivery's age (its first reply's number) and settled replies.
    by_delivery: HashMap<String, (u64, HashMap<Address, Reply>)>,
    /// The deliveries by age, to forget the oldest first.
    by_age: BTreeMap<u64, String>,
}

impl Progress {
    /// The settled replies remembered for `delivery`.
    pub fn settled(&self, delivery: &str) -> HashMap<Address, Reply> {
        self.inner
            .lock()
            .ok()
            .and_then(|m| m.by_delivery.get(delivery).map(|(_, r)| r.clone()))
            .unwrap_or_default()
    }

    /// Remembers `reply` for `to` when it is settled; forgets the oldest
    /// delivery past [`REMEMBERED`].
    pub fn remember(&self, delivery: &str, to: &Address, reply: &Reply) {
        if !reply.settled() {
            return;
        }
        let Ok(mut m) = self.inner.lock() else {
            return;
        };
        let m = &mut *m;
        if !m.by_delivery.contains_key(delivery) {
            m.next += 1;
            m.by_age.insert(m.next, delivery.to_string());
            m.by_delivery
                .insert(delivery.to_string(), (m.next, HashMap::new()));
            while m.by_delivery.len() > REMEMBERED {
                let Some((_, oldest)) = m.by_age.pop_first() else {
                    break;
                };
                m.by_delivery.remove(&oldest);
            }
        }
        if let Some((_, replies)) = m.by_delivery.get_mut(delivery) {
            replies.insert(to.clone(), reply.clone());
        }
    }

    /// Forgets `delivery`, its outcome final.
    pub fn forget(&self, delivery: &str) {
        if let Ok(mut m) = self.inner.lock()
            && let Some((age, _)) = m.by_delivery.remove(delivery)
        {
            m.by_age.remove(&age);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().map(|m| m.by_delivery.len()).unwrap_or(0)
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
                "smtp: o@x, p@x: mailed; u@x, v@x: permanent error (550): no such mailbox".into()
            )
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
    fn only_settled_replies_are_remembered_and_the_oldest_forgotten() {
        let p = Progress::default();
        p.remember("e1", &a("o@x"), &Reply::Mailed);
        p.remember("e1", &a("b@x"), &Reply::RefusedForNow("later".into()));
        assert_eq!(p.settled("e1"), HashMap::from([(a("o@x"), Reply::Mailed)]));
        for i in 0..REMEMBERED {
            p.remember(&format!("d{i}"), &a("o@x"), &Reply::Mailed);
        }
        assert_eq!(p.len(), REMEMBERED);
        assert!(p.settled("e1").is_empty(), "the oldest is forgotten");
        p.forget("d5");
        assert!(p.settled("d5").is_empty());
        assert_eq!(p.len(), REMEMBERED - 1);
    }
}
