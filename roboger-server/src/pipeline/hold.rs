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
//! A hold is for the endpoint's settings the target answered: a delivery
//! made with other settings (the endpoint was changed since) is not held
//! by it, and the change makes the deliveries put off due again
//! (`Store::endpoint_waiting_made_due`).
//!
//! Invariant: the map holds only endpoints whose hold has not ended
//! (ended ones are dropped as a hold is taken and as the dispatcher asks
//! whether any is held), so it never grows past the endpoints held at
//! one moment, and the dispatcher's check is one lock of an empty map
//! once the holds are over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::Value;

/// The endpoints on hold, each until when and for which settings.
#[derive(Debug, Default)]
pub(super) struct Holds {
    until: Mutex<HashMap<i64, Hold>>,
}

#[derive(Debug)]
struct Hold {
    end: DateTime<Utc>,
    config: Arc<Value>,
}

impl Holds {
    /// Puts `endpoint` with `config` on hold until `until`, or keeps its
    /// later hold for the same settings.
    pub(super) fn hold(&self, endpoint: i64, config: &Arc<Value>, until: DateTime<Utc>) {
        let Ok(mut held) = self.until.lock() else {
            return;
        };
        let now = Utc::now();
        held.retain(|_, h| h.end > now);
        let fresh = || Hold {
            end: until,
            config: config.clone(),
        };
        let h = held.entry(endpoint).or_insert_with(fresh);
        if *h.config == **config {
            h.end = h.end.max(until);
        } else {
            *h = fresh();
        }
    }

    /// When `endpoint`'s hold ends, if it is held at `now` for `config`.
    pub(super) fn until(
        &self,
        endpoint: i64,
        config: &Value,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let held = self.until.lock().ok()?;
        held.get(&endpoint)
            .filter(|h| h.end > now && *h.config == *config)
            .map(|h| h.end)
    }

    /// Whether any endpoint is held at `now` (so the dispatcher need not
    /// look each delivery up when none is); drops the ended holds.
    pub(super) fn any(&self, now: DateTime<Utc>) -> bool {
        self.until.lock().is_ok_and(|mut held| {
            held.retain(|_, h| h.end > now);
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
        let c = Arc::new(serde_json::json!({"url": "http://a/"}));
        holds.hold(1, &c, now + s(30));
        holds.hold(1, &c, now + s(10));
        assert_eq!(holds.until(1, &c, now), Some(now + s(30)));
        assert_eq!(holds.until(2, &c, now), None);
        assert_eq!(holds.until(1, &c, now + s(30)), None, "ended");
        // An ended hold is dropped when another is taken.
        holds.hold(2, &c, now - s(1));
        holds.hold(3, &c, now + s(5));
        assert_eq!(holds.until.lock().map(|h| h.len()).ok(), Some(2));
        // Once every hold has ended, none is left behind.
        assert!(holds.any(now + s(10)));
        assert!(!holds.any(now + s(30)));
        assert_eq!(holds.until.lock().map(|h| h.len()).ok(), Some(0));
    }

    /// A hold is for the settings the target answered: a delivery made
    /// with the endpoint's new settings is not held, and the first
    /// answer to those starts a hold of their own.
    #[test]
    fn a_hold_is_for_the_settings_the_target_answered() {
        let holds = Holds::default();
        let now = Utc::now();
        let s = chrono::Duration::seconds;
        let old = Arc::new(serde_json::json!({"url": "http://a/"}));
        let new = Arc::new(serde_json::json!({"url": "http://b/"}));
        holds.hold(1, &old, now + s(60));
        assert_eq!(holds.until(1, &old, now), Some(now + s(60)));
        assert_eq!(holds.until(1, &new, now), None);
        holds.hold(1, &new, now + s(5));
        assert_eq!(
            holds.until(1, &new, now),
            Some(now + s(5)),
            "not kept at 60 s"
        );
        assert_eq!(holds.until(1, &old, now), None);
    }
}
