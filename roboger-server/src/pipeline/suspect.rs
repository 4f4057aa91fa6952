//! Poison events: an event that makes its plugin end (exit, crash) each
//! time it is sent must not take the plugin's other deliveries down with
//! it, nor have the plugin restarted until it is marked failed.
//!
//! A plugin that ends during a call cannot say which of the events in
//! flight was the cause, so every delivery then in flight becomes a
//! *suspect*: its attempt fails saying it is sent alone next time. A
//! suspect goes in no batch, and its send is made with nothing else in
//! flight on the plugin (`Supervisor::send_alone`). When the plugin ends
//! again during that send, having delivered other events since it
//! started, the event is the cause: its delivery fails for good, saying
//! so, and is not tried again. A plugin that ends before it delivers
//! anything is broken for every event, not by this one: its suspect is
//! tried again, still a suspect, and the supervisor's crash budget marks
//! the plugin failed as before.
//!
//! Whether a delivery is a suspect is written in its `last_error` (the
//! words [`ALONE_NEXT`]), which every node reads as it claims the
//! delivery: a suspect stays one whichever node tries it next, and one
//! retried by hand after failing for good is sent alone again.
//!
//! Invariant: a suspect stays one until a send made alone is answered
//! (delivered or an error the plugin gave), or the plugin ends during
//! it; a try that could not be made alone keeps it a suspect.

use crate::supervisor::CallError;

/// The words in a delivery's `last_error` that make it a suspect.
const ALONE_NEXT: &str = "it is sent alone next time";

/// Whether a delivery whose last error was `last_error` is a suspect.
pub(super) fn is_suspect(last_error: Option<&str>) -> bool {
    last_error.is_some_and(|e| e.contains(ALONE_NEXT))
}

/// The last error to write for a try that failed with `error`, of a
/// delivery that was (`suspect`) or was not a suspect, and whether that
/// error fails it for good.
pub(super) fn said(error: &CallError, suspect: bool) -> (String, bool) {
    match error {
        CallError::Ended {
            plugin,
            why,
            cause: true,
        } => (
            format!(
                "plugin {plugin} ended while this event was being sent to it alone ({why}), \
                 having delivered others since it started: this event is taken as the cause \
                 and not tried again; retried by hand, {ALONE_NEXT}"
            ),
            true,
        ),
        CallError::Ended { plugin, why, .. } => (
            format!(
                "plugin {plugin} ended while this event was being sent ({why}); \
                 {ALONE_NEXT}, to learn whether it is the cause"
            ),
            false,
        ),
        // Not answered by the plugin: the send was not made alone, or
        // not to its end.
        CallError::Unavailable(..)
        | CallError::NotMade(..)
        | CallError::NotRunning(..)
        | CallError::NotConfigured(_)
            if suspect =>
        {
            (kept(error.to_string()), false)
        }
        _ => (error.to_string(), false),
    }
}

/// `said`, the last error of a suspect that was not sent (put off, or
/// its plugin not there), saying it still is one.
pub(super) fn kept(said: String) -> String {
    format!("{said}; it was in flight when its plugin ended before, so {ALONE_NEXT}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(cause: bool) -> CallError {
        CallError::Ended {
            plugin: "t".into(),
            why: "process exited (exit status: 3)".into(),
            cause,
        }
    }

    #[test]
    fn a_suspect_stays_one_until_a_send_alone_is_answered() {
        let text = |e: CallError, suspect| said(&e, suspect);
        // In flight when the plugin ended: a suspect.
        let (first, fails) = text(ended(false), false);
        assert!(is_suspect(Some(&first)) && !fails, "{first}");
        // Sent alone, the plugin ended again: failed for good, and a
        // suspect again if retried by hand.
        let (cause, fails) = text(ended(true), true);
        assert!(fails && is_suspect(Some(&cause)), "{cause}");
        // Not sent alone to its end: still a suspect.
        let busy = CallError::NotMade("t".into(), "it is restarting".into());
        let (still, fails) = text(busy.clone(), true);
        assert!(is_suspect(Some(&still)) && !fails, "{still}");
        assert!(!is_suspect(Some(&text(busy, false).0)));
        // Answered by the plugin: no longer one.
        let (answered, fails) = text(CallError::Failed("HTTP 500".into()), true);
        assert!(!is_suspect(Some(&answered)) && !fails, "{answered}");
        assert!(!is_suspect(None));
    }
}
