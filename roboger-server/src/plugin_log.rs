//! A plugin's log lines (its stderr, and its `log` calls) in the server's
//! log, within a budget: at most [`LINES_PER_MINUTE`] from each plugin in
//! a minute's window; the rest of the window's are dropped and counted.
//!
//! A plugin that loops over a failure and prints each time would
//! otherwise fill the server's log at the speed of its loop: one writing
//! to its stderr in a loop put 554,000 lines (59 MB) there in 8 s (see
//! `log_budget` for what that does). At the budget every plugin of a
//! server with a dozen stays under journald's rate limit together.
//! Lines of a level the server's log leaves out (`RUST_LOG`) cost
//! nothing. A line is kept to [`LINE_MAX`] bytes, whichever way it came.
//!
//! The budget is the plugin's, not its process's: a plugin that floods
//! at each start of a crash loop is held to it across its restarts.
//!
//! Invariant: no plugin has more than [`LINES_PER_MINUTE`] of its lines
//! written in a window; when it has lines dropped the log says so at the
//! first, and says how many once the window has ended (at the plugin's
//! next line) or its process has ended.

use crate::log_budget::{Drops, LogBudget};

/// How many lines of one plugin are written in a minute.
pub const LINES_PER_MINUTE: u32 = 1000;

/// The longest line of a plugin's kept whole (in bytes); the rest is
/// dropped, and the line says how much.
pub const LINE_MAX: usize = 16 * 1024;

/// What a line cut at [`LINE_MAX`] ends with.
pub fn cut_note(dropped: usize) -> String {
    format!(" [{dropped} more bytes of this line dropped]")
}

/// `text` (a `log` call's message) cut at [`LINE_MAX`], as the
/// supervisor cuts a line of stderr while it reads it.
pub fn cut(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= LINE_MAX {
        return text.into();
    }
    let mut end = LINE_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}", &text[..end], cut_note(text.len() - end)).into()
}

/// One plugin's log, and its budget.
#[derive(Debug)]
pub struct PluginLog {
    plugin: String,
    budget: LogBudget,
}

impl PluginLog {
    pub fn new(plugin: &str) -> PluginLog {
        PluginLog {
            plugin: plugin.to_string(),
            budget: LogBudget::new(LINES_PER_MINUTE),
        }
    }

    /// Writes the plugin's `text` at `level` to the server's log, within
    /// its budget.
    pub fn write(&self, level: tracing::Level, text: &str) {
        use tracing::Level;
        let shown = match level {
            Level::ERROR => tracing::enabled!(Level::ERROR),
            Level::WARN => tracing::enabled!(Level::WARN),
            Level::INFO => tracing::enabled!(Level::INFO),
            Level::DEBUG => tracing::enabled!(Level::DEBUG),
            _ => tracing::enabled!(Level::TRACE),
        };
        if !shown {
            return;
        }
        let plugin = self.plugin.as_str();
        let written = self.budget.pass(|drops| match drops {
            Drops::Were(n) => self.said_dropped(n, "in the minute before"),
            Drops::Begin => tracing::warn!(
                plugin = %plugin,
                "the plugin has written {LINES_PER_MINUTE} log lines in a minute: the rest of \
                 the minute's are dropped, and counted"
            ),
        });
        if !written {
            return;
        }
        match level {
            Level::ERROR => tracing::error!(plugin = %plugin, "{text}"),
            Level::WARN => tracing::warn!(plugin = %plugin, "{text}"),
            Level::INFO => tracing::info!(plugin = %plugin, "{text}"),
            Level::DEBUG => tracing::debug!(plugin = %plugin, "{text}"),
            _ => tracing::trace!(plugin = %plugin, "{text}"),
        }
    }

    /// Its lines dropped since the server started (for the metrics).
    pub fn dropped_total(&self) -> u64 {
        self.budget.dropped_total()
    }

    /// Says how many lines were dropped and not yet said, once the
    /// plugin's process has ended (its stderr read to the end).
    pub fn process_ended(&self) {
        let dropped = self.budget.take_dropped();
        if dropped > 0 {
            self.said_dropped(dropped, "before its process ended");
        }
    }

    fn said_dropped(&self, n: u64, when: &str) {
        tracing::warn!(
            plugin = %self.plugin,
            dropped = n,
            "{n} log lines of the plugin dropped {when}, past {LINES_PER_MINUTE} a minute"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long message is cut at a character's boundary at most
    /// [`LINE_MAX`] bytes in, saying how many bytes it dropped.
    #[test]
    fn a_long_message_is_cut_between_characters() {
        assert_eq!(cut("short"), "short");
        // "é" is two bytes: LINE_MAX + 1 falls inside one.
        let text = format!("a{}", "é".repeat(LINE_MAX));
        let got = cut(&text);
        let kept = LINE_MAX - 1;
        let dropped = text.len() - kept;
        assert_eq!(got, format!("{}{}", &text[..kept], cut_note(dropped)));
    }
}
