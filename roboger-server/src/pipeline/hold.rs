//! Endpoints on hold: a target that answered "wait" (a -32002 error with
//! `retry_after`: Slack's or Telegram's rate limit, another Roboger over
//! its address's limit) is asked nothing more until then, through that
//! endpoint, by this node. Without it every delivery to the endpoint
//! would meet the same refusal and spend an attempt of its own.
//!
//! A hold is what one node learned from a target's answer, not shared
//! state: another node learns it from its own first refusal. A delivery
//! put off by a hold keeps its attempts and is made due again at the
//! hold's end, in the database (`Store::put_off`, its lease released), so
//! a node that stops loses nothing.
//!
//! Invariant: the map holds only endpoints whose hold has not ended
//! (ended ones are dropped as a hold is taken and as the dispatcher asks
//! whether any is held), so it never grows past the endpoints held at
//! one moment, and the dispatcher's check is one lock of an empty map
//! once the holds are over.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

/// The endpoints on hold, each until when.
#[derive(Debug, Default)]
pub(super) struct Holds {
    until: Mutex<HashMap<i64, DateTime<Utc>>>,
}

impl Holds {
    /// Puts `endpoint` on hold until `until`, or keeps its later hold.
    pub(super) fn hold(&self, endpoint: i64, until: DateTime<Utc>) {
        let Ok(mut held) = self.until.lock() else {
            return;
        };
        let now = Utc::now();
        held.retain(|_, end| *end > now);
        let end = held.entry(endpoint).or_insert(until);
        *end = (*end).max(until);
    }

    /// When `endpoint`'s hold ends, if it is held at `now`.
    pub(super) fn until(&self, endpoint: i64, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let held = self.until.lock().ok()?;
        held.get(&endpoint).copied().filter(|end| *end > now)
    }

    /// Whether any endpoint is held at `now` (so the dispatcher need not
    /// look each delivery up when none is); drops the ended holds.
    pub(super) fn any(&self, now: DateTime<Utc>) -> bool {
        self.until.lock().is_ok_and(|mut held| {
            held.retain(|_, end| *end > now);
            !held.is_empty()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_lasts_until_its_end_and_the_later_of_two_wins() {
        let holds = Holds::default();
        let now = Utc::now();
        let s = chrono::Duration::seconds;
        assert!(!holds.any(now));
        holds.hold(1, now + s(30));
        holds.hold(1, now + s(10));
        assert_eq!(holds.until(1, now), Some(now + s(30)));
        assert_eq!(holds.until(2, now), None);
        assert_eq!(holds.until(1, now + s(30)), None, "ended");
        // An ended hold is dropped when another is taken.
        holds.hold(2, now - s(1));
        holds.hold(3, now + s(5));
        assert_eq!(holds.until.lock().map(|h| h.len()).ok(), Some(2));
        // Once every hold has ended, none is left behind.
        assert!(holds.any(now + s(10)));
        assert!(!holds.any(now + s(30)));
        assert_eq!(holds.until.lock().map(|h| h.len()).ok(), Some(0));
    }
}
