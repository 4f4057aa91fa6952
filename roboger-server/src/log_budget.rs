//! A budget of log lines of one kind: at most so many in a minute's
//! window; the rest of the window's are dropped and counted, for the
//! caller to say how many.
//!
//! Lines that come once per event, per delivery, per request or per line
//! a plugin prints would otherwise fill the log at the speed of what
//! makes them (a target down under a burst of pushes, a plugin printing
//! in a loop, a client refused in a loop), burying the other lines,
//! filling the disk, and under systemd making journald's rate limit (by
//! default 10,000 messages per 30 s for the whole unit) drop the server's
//! own warnings with them. Each kind has its own budget, so one flood
//! does not silence the others. `plugin_log` keeps one per plugin; the
//! server's own kinds are [`Lines`] here, each with what else counts
//! them: [`RETRIED`] and [`FAILED`] (the pipeline's outcomes),
//! [`REFUSED`] (the management API's refusals), [`DATABASE`]
//! (requests failed on a database error) and [`PLUGIN_DATABASE`] (plugin
//! callbacks failed on one).
//!
//! Invariant: no budget lets more than its lines a window through; the
//! count of those it dropped is handed out once: at the first line after
//! the window has ended ([`LogBudget::pass`]), or to whoever asks for it
//! ([`LogBudget::ended`], [`LogBudget::take_dropped`]; [`say_ended`] for
//! the server's own kinds).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The window a budget is counted over.
const WINDOW: Duration = Duration::from_secs(60);

/// One kind of line's budget, and what its current window has taken.
#[derive(Debug)]
pub struct LogBudget {
    per_window: u32,
    window: Mutex<Window>,
    /// Lines dropped since start, for the metrics.
    dropped_total: AtomicU64,
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
    /// The window's first line dropped: to be said, the others not.
    FirstDropped,
    Dropped,
}

/// What the owner of a budget is to say of its drops, in its own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drops {
    /// The window has used its budget: the rest of its lines are dropped.
    Begin,
    /// So many lines were dropped and not yet said.
    Were(u64),
}

impl LogBudget {
    /// A budget of `per_window` lines a [`WINDOW`].
    pub const fn new(per_window: u32) -> LogBudget {
        LogBudget {
            per_window,
            window: Mutex::new(Window {
                start: None,
                written: 0,
                dropped: 0,
            }),
            dropped_total: AtomicU64::new(0),
        }
    }

    /// Whether a line that comes now is written. `say` is told first what
    /// to say of the drops: the count of the window that has ended, and
    /// that dropping begins.
    pub fn pass(&self, mut say: impl FnMut(Drops)) -> bool {
        let admit = self.admit_at(Instant::now());
        if admit.ended_dropped > 0 {
            say(Drops::Were(admit.ended_dropped));
        }
        match admit.verdict {
            Verdict::Write => true,
            Verdict::FirstDropped => {
                say(Drops::Begin);
                false
            }
            Verdict::Dropped => false,
        }
    }

    fn admit_at(&self, now: Instant) -> Admit {
        let mut w = self.window();
        let mut ended_dropped = 0;
        if w.start
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            ended_dropped = std::mem::take(&mut w.dropped);
            w.start = Some(now);
            w.written = 0;
        }
        let verdict = if w.written < self.per_window {
            w.written += 1;
            Verdict::Write
        } else {
            w.dropped += 1;
            self.dropped_total.fetch_add(1, Ordering::Relaxed);
            match w.dropped {
                1 => Verdict::FirstDropped,
                _ => Verdict::Dropped,
            }
        };
        Admit {
            ended_dropped,
            verdict,
        }
    }

    /// The lines dropped and not yet said, once the window they were
    /// dropped in has ended (a task that ticks says them without waiting
    /// for another line); 0 while it goes on.
    pub fn ended(&self) -> u64 {
        self.ended_at(Instant::now())
    }

    fn ended_at(&self, now: Instant) -> u64 {
        let mut w = self.window();
        match w.start {
            Some(start) if now.duration_since(start) >= WINDOW => std::mem::take(&mut w.dropped),
            _ => 0,
        }
    }

    /// The lines dropped and not yet said, whether or not their window
    /// has ended (what made them has: a plugin's process).
    pub fn take_dropped(&self) -> u64 {
        std::mem::take(&mut self.window().dropped)
    }

    /// The lines it has dropped since the server started.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// Its window, even if a thread panicked holding it (a count is
    /// still a count).
    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        match self.window.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// How many lines of each of the server's own kinds the log gets in a
/// minute. Each comes once per try of a delivery, or per request: in a
/// target's outage under a burst of pushes they came by the thousand a
/// second (30,000 events to a target down: 182,000 lines in 7 minutes),
/// a client refused in a loop wrote one line per request (20,000 in
/// 4 s), and so did pushes counted against limits on a full disk (1,800
/// a second). What they say is kept elsewhere anyway (see each kind's
/// `counted`).
pub const LINES_PER_MINUTE: u32 = 600;

/// The lines of requests answered 503 for a database error their handler
/// met (`api::error`): during an outage, or on a full disk, each request
/// would write one, at the speed of the pushes to an address with limits.
/// (The group commit's failures are the writer's, said as an outage.)
pub static DATABASE: Lines = Lines::new(
    "requests failed on a database error",
    "each is answered 503 and counted in roboger_request_database_errors_total",
);

/// The lines of plugin callbacks failed on a database error (`host`): a
/// plugin whose every send makes a query that fails, or every plugin's
/// calls during an outage, would write one per event.
pub static PLUGIN_DATABASE: Lines = Lines::new(
    "plugin callbacks failed on a database error",
    "each is answered to its plugin as an error and counted in \
     roboger_plugin_database_errors_total",
);

/// One kind of the server's own lines, and its budget.
#[derive(Debug)]
pub struct Lines {
    /// What the log calls them.
    kind: &'static str,
    /// Where what they say is counted even when they are not written.
    counted: &'static str,
    budget: LogBudget,
    /// Lines offered since start, written or not.
    offered: AtomicU64,
}

/// The lines of deliveries that failed and are retried.
pub static RETRIED: Lines = Lines::new(
    "deliveries that failed and are retried",
    "each delivery's outcome is in the event API, and in roboger_deliveries_total",
);

/// The lines of deliveries that failed for good.
pub static FAILED: Lines = Lines::new(
    "deliveries that failed for good",
    "each delivery's outcome is in the event API, and in roboger_deliveries_total",
);

/// The lines of management, console and metrics requests refused: a
/// client not in `master.allow`, a wrong master key, a failed sign-in.
pub static REFUSED: Lines = Lines::new(
    "refused management access",
    "each refusal is in roboger_management_refused_total",
);

impl Lines {
    const fn new(kind: &'static str, counted: &'static str) -> Lines {
        Lines {
            kind,
            counted,
            budget: LogBudget::new(LINES_PER_MINUTE),
            offered: AtomicU64::new(0),
        }
    }

    /// How many lines of this kind were offered since the server started,
    /// written or not: for the kinds nothing else counts (requests and
    /// plugin callbacks failed on a database error), what the metrics
    /// show.
    pub fn offered_total(&self) -> u64 {
        self.offered.load(Ordering::Relaxed)
    }

    /// Whether a line of this kind is written now. Says first how many
    /// the minute before dropped, and when dropping begins.
    pub fn logged(&self) -> bool {
        self.offered.fetch_add(1, Ordering::Relaxed);
        self.budget.pass(|drops| match drops {
            Drops::Were(n) => self.said_dropped(n),
            Drops::Begin => tracing::warn!(
                "{LINES_PER_MINUTE} lines of {} logged in a minute: the rest of the minute's are \
                 not, but counted ({})",
                self.kind,
                self.counted
            ),
        })
    }

    /// The lines it dropped since the server started (for the metrics).
    pub fn dropped_total(&self) -> u64 {
        self.budget.dropped_total()
    }

    fn said_dropped(&self, n: u64) {
        tracing::warn!(
            dropped = n,
            "{n} lines of {} not logged in the minute before, past {LINES_PER_MINUTE} a minute",
            self.kind
        );
    }
}

/// Says how many lines of each of the server's own kinds a minute that
/// has ended dropped, without waiting for the next such line (which may
/// come much later, or never). The pipeline's sweeper calls it at each
/// tick.
pub fn say_ended() {
    for lines in [&RETRIED, &FAILED, &REFUSED, &DATABASE, &PLUGIN_DATABASE] {
        let n = lines.budget.ended();
        if n > 0 {
            lines.said_dropped(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget's lines are written, the next is said to start the
    /// drops, the rest are dropped; the first line of the next window is
    /// written, and brings the count of the drops before it, unless a
    /// tick took it once the window had ended.
    #[test]
    fn a_window_writes_its_budget_and_counts_the_rest() {
        let b = LogBudget::new(100);
        let t0 = Instant::now();
        for i in 0..100 {
            let at = t0 + Duration::from_millis(i);
            assert_eq!(
                b.admit_at(at),
                Admit {
                    ended_dropped: 0,
                    verdict: Verdict::Write
                }
            );
        }
        let later = t0 + Duration::from_secs(30);
        assert_eq!(b.admit_at(later).verdict, Verdict::FirstDropped);
        for _ in 0..41 {
            assert_eq!(b.admit_at(later).verdict, Verdict::Dropped);
        }
        assert_eq!(b.ended_at(later), 0, "the window goes on");
        // A minute after the window's first line, not its last.
        let next = t0 + WINDOW;
        assert_eq!(
            b.admit_at(next),
            Admit {
                ended_dropped: 42,
                verdict: Verdict::Write
            }
        );
        // Dropped again, and taken by a tick once that window has ended.
        for _ in 0..100 {
            b.admit_at(next);
        }
        assert_eq!(b.ended_at(next + WINDOW), 1);
        assert_eq!(b.admit_at(next + WINDOW).ended_dropped, 0);
        assert_eq!(b.take_dropped(), 0);
        assert_eq!(b.dropped_total(), 43);
    }

    /// `pass` says that dropping begins once, at the first line dropped.
    #[test]
    fn passing_says_when_the_drops_begin() {
        let b = LogBudget::new(1);
        let mut said = Vec::new();
        let passed: Vec<bool> = (0..3).map(|_| b.pass(|d| said.push(d))).collect();
        assert_eq!(passed, [true, false, false]);
        assert_eq!(said, [Drops::Begin]);
    }
}
