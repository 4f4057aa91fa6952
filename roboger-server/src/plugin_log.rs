//! A plugin's log lines (its stderr, and its `log` calls) in the server's
//! log, within a budget: at most [`LINES_PER_MINUTE`] from each plugin in
//! a minute's window; the rest of the window's are dropped and counted.
//!
//! A plugin that loops over a failure and prints each time would
//! otherwise fill the server's log at the speed of its loop: one writing
//! to its stderr in a loop put 554,000 lines (59 MB) there in 8 s. That
//! buries the server's own lines, fills the disk, and under systemd
//! makes journald's rate limit (by default 10,000 messages per 30 s for
//! the whole unit) drop the server's own warnings with the plugin's. At
//! the budget every plugin of a server with a dozen stays under that
//! limit together. Lines of a level the server's log leaves out
//! (`RUST_LOG`) cost nothing.
//!
//! The budget is the plugin's, not its process's: a plugin that floods
//! at each start of a crash loop is held to it across its restarts.
//!
//! Invariant: no plugin has more than [`LINES_PER_MINUTE`] of its lines
//! written in a window; when it has lines dropped the log says so at the
//! first, and says how many once the window has ended (at the plugin's
//! next line) or its process has ended.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How many lines of one plugin are written in a [`WINDOW`].
pub const LINES_PER_MINUTE: u32 = 1000;

/// The window the budget is counted over.
const WINDOW: Duration = Duration::from_secs(60);

/// One plugin's log, and what its current window has taken of it.
#[derive(Debug)]
pub struct PluginLog {
    plugin: String,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When it began, at its first line.
    start: Option<Instant>,
    written: u32,
    /// Lines dropped and not yet said.
    dropped: u64,
}

/// What to do with a line.
#[derive(Debug, PartialEq, Eq)]
struct Admit {
    /// Lines dropped in the window that has ended, to be said first.
    ended_dropped: u64,
    verdict: Verdict,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Write,
    /// The window's first line dropped: said, and then not the others.
    FirstDropped,
    Dropped,
}

impl Window {
    fn admit(&mut self, now: Instant) -> Admit {
        let mut ended_dropped = 0;
        let ended = self
            .start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if ended {
            ended_dropped = std::mem::take(&mut self.dropped);
            self.start = Some(now);
            self.written = 0;
        }
        let verdict = if self.written < LINES_PER_MINUTE {
            self.written += 1;
            Verdict::Write
        } else {
            self.dropped += 1;
            match self.dropped {
                1 => Verdict::FirstDropped,
                _ => Verdict::Dropped,
            }
        };
        Admit {
            ended_dropped,
            verdict,
        }
    }
}

impl PluginLog {
    pub fn new(plugin: &str) -> PluginLog {
        PluginLog {
            plugin: plugin.to_string(),
            window: Mutex::new(Window {
                start: None,
                written: 0,
                dropped: 0,
            }),
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
        let Ok(admit) = self.window.lock().map(|mut w| w.admit(Instant::now())) else {
            return;
        };
        let plugin = self.plugin.as_str();
        if admit.ended_dropped > 0 {
            self.said_dropped(admit.ended_dropped, "in the minute before");
        }
        match admit.verdict {
            Verdict::Write => match level {
                Level::ERROR => tracing::error!(plugin = %plugin, "{text}"),
                Level::WARN => tracing::warn!(plugin = %plugin, "{text}"),
                Level::INFO => tracing::info!(plugin = %plugin, "{text}"),
                Level::DEBUG => tracing::debug!(plugin = %plugin, "{text}"),
                _ => tracing::trace!(plugin = %plugin, "{text}"),
            },
            Verdict::FirstDropped => tracing::warn!(
                plugin = %plugin,
                "the plugin has written {LINES_PER_MINUTE} log lines in a minute: the rest of \
                 the minute's are dropped, and counted"
            ),
            Verdict::Dropped => {}
        }
    }

    /// Says how many lines were dropped and not yet said, once the
    /// plugin's process has ended (its stderr read to the end).
    pub fn process_ended(&self) {
        let dropped = self
            .window
            .lock()
            .map(|mut w| std::mem::take(&mut w.dropped))
            .unwrap_or_default();
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

    fn window() -> Window {
        Window {
            start: None,
            written: 0,
            dropped: 0,
        }
    }

    /// The budget's lines are written, the next is said to start the
    /// drops, the rest are dropped; the first line of the next window is
    /// written, and brings the count of the drops before it.
    #[test]
    fn a_minute_writes_its_budget_and_counts_the_rest() {
        let mut w = window();
        let t0 = Instant::now();
        for i in 0..LINES_PER_MINUTE {
            let at = t0 + Duration::from_millis(u64::from(i));
            assert_eq!(
                w.admit(at),
                Admit {
                    ended_dropped: 0,
                    verdict: Verdict::Write
                }
            );
        }
        let later = t0 + Duration::from_secs(30);
        assert_eq!(w.admit(later).verdict, Verdict::FirstDropped);
        for _ in 0..41 {
            assert_eq!(w.admit(later).verdict, Verdict::Dropped);
        }
        // A minute after the window's first line, not its last.
        let next = t0 + WINDOW;
        assert_eq!(
            w.admit(next),
            Admit {
                ended_dropped: 42,
                verdict: Verdict::Write
            }
        );
        assert_eq!(w.written, 1);
        assert_eq!(w.admit(next + WINDOW).ended_dropped, 0);
    }
}
