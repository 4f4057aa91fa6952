//! How a task that runs again and again (a heartbeat, a claim of due
//! deliveries, a group commit, the accept loop) says that it keeps
//! failing: a failure at once, then at most one line a minute with how
//! many failures there were since, and one line when it works again, with
//! how long it did not.
//!
//! While the database cannot be reached every such task fails several
//! times a second; logged each time, an outage of an hour would be tens of
//! thousands of lines, burying its first cause and filling the journal.
//! A task that flaps (out of file descriptors, each closed connection lets
//! one more in) is said to fail once a minute too, not at each flap: the
//! price is that a failure less than a minute after the last one said
//! (and its end) is said when that minute is over, with its count.
//! A task keeps one [`Outage`] and reports each of its runs to it.
//!
//! Invariant: a failure is logged, with its error, when no failure of
//! the task was logged in the last minute; a success is logged when the
//! log last said the task fails.

use std::fmt::Display;
use std::time::Duration;

use tokio::time::Instant;

/// How often a failure that goes on is said again.
pub const REMIND: Duration = Duration::from_secs(60);

/// What the log has said of one task's failures.
#[derive(Debug)]
pub struct Outage {
    /// What the task cannot do, as the log says it: "cannot claim due
    /// deliveries".
    failing: &'static str,
    /// What it does again once it works: "due deliveries are claimed
    /// again".
    again: &'static str,
    /// Whether its failures are errors rather than warnings.
    error: bool,
    /// The failures since the log said the task fails, when it says so.
    said: Option<Said>,
    /// When a failure was last logged.
    last_line: Option<Instant>,
    /// The failures since then, not logged.
    unsaid: u64,
    /// When the first of them came, of those since the log last said the
    /// task works.
    unsaid_since: Option<Instant>,
}

#[derive(Debug)]
struct Said {
    since: Instant,
    failures: u64,
}

impl Outage {
    /// A task whose failures are warnings.
    pub const fn new(failing: &'static str, again: &'static str) -> Self {
        Outage {
            failing,
            again,
            error: false,
            said: None,
            last_line: None,
            unsaid: 0,
            unsaid_since: None,
        }
    }

    /// A task whose failures are errors (what users are refused for).
    pub const fn errors(failing: &'static str, again: &'static str) -> Self {
        Outage {
            error: true,
            ..Outage::new(failing, again)
        }
    }

    /// Reports a failed run: logged unless a failure was logged less than
    /// [`REMIND`] ago, with the failures not logged meanwhile.
    pub fn failed(&mut self, error: impl Display) {
        let now = Instant::now();
        if let Some(s) = self.said.as_mut() {
            s.failures += 1;
        }
        if self
            .last_line
            .is_some_and(|t| now.duration_since(t) < REMIND)
        {
            self.unsaid += 1;
            if self.said.is_none() {
                self.unsaid_since.get_or_insert(now);
            }
            return;
        }
        let unsaid = std::mem::take(&mut self.unsaid);
        let since = self.unsaid_since.take().unwrap_or(now);
        self.last_line = Some(now);
        match &self.said {
            Some(s) => self.say(
                format_args!(
                    "{}, still: {} failures in {}, {} of them since the last line",
                    self.failing,
                    s.failures,
                    seconds(now.duration_since(s.since)),
                    unsaid + 1
                ),
                &error,
                Some(s.failures),
            ),
            None if unsaid == 0 => self.say(format_args!("{}", self.failing), &error, None),
            None => self.say(
                format_args!(
                    "{}, again: {} failures in {} since the last line",
                    self.failing,
                    unsaid + 1,
                    seconds(now.duration_since(since))
                ),
                &error,
                Some(unsaid + 1),
            ),
        }
        if self.said.is_none() {
            self.said = Some(Said {
                since,
                failures: unsaid + 1,
            });
        }
    }

    /// Reports a run that worked: logged when the log last said the task
    /// fails.
    pub fn succeeded(&mut self) {
        if let Some(s) = self.said.take() {
            // The failures not logged are counted in this line.
            self.unsaid = 0;
            self.unsaid_since = None;
            tracing::info!(
                failures = s.failures,
                "{} after {} failures in {}",
                self.again,
                s.failures,
                seconds(s.since.elapsed())
            );
        }
    }

    fn say(&self, message: std::fmt::Arguments<'_>, error: &impl Display, failures: Option<u64>) {
        match (self.error, failures) {
            (true, None) => tracing::error!(error = %error, "{message}"),
            (true, Some(n)) => tracing::error!(error = %error, failures = n, "{message}"),
            (false, None) => tracing::warn!(error = %error, "{message}"),
            (false, Some(n)) => tracing::warn!(error = %error, failures = n, "{message}"),
        }
    }
}

/// A duration as an operator reads it: "4.2 s", "3 min 5 s".
fn seconds(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{:.1} s", d.as_secs_f64())
    } else if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3600, s % 3600 / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the log says of a task that fails for three minutes, at four
    /// failures a second, then works: four lines, not 720.
    #[tokio::test(start_paused = true)]
    async fn an_outage_is_said_once_a_minute_and_its_end_once() {
        let lines = Lines::default();
        let _guard = tracing::subscriber::set_default(lines.subscriber());
        let mut o = Outage::new(
            "cannot claim due deliveries",
            "due deliveries are claimed again",
        );
        o.succeeded();
        assert!(
            lines.take().is_empty(),
            "a success after a success says nothing"
        );
        for _ in 0..720 {
            o.failed("pool timed out");
            tokio::time::advance(Duration::from_millis(250)).await;
        }
        o.succeeded();
        let said = lines.take();
        assert_eq!(said.len(), 4, "{said:#?}");
        assert!(
            said[0].starts_with("WARN cannot claim due deliveries error=pool timed out"),
            "{}",
            said[0]
        );
        assert!(
            said[1].starts_with(
                "WARN cannot claim due deliveries, still: 241 failures in 1 min 0 s, 240 of them since the last line"
            ),
            "{}",
            said[1]
        );
        assert!(
            said[2].contains("still: 481 failures in 2 min 0 s, 240 of them"),
            "{}",
            said[2]
        );
        assert!(
            said[3].starts_with(
                "INFO due deliveries are claimed again after 720 failures in 3 min 0 s"
            ),
            "{}",
            said[3]
        );
        // The next failure is a new outage, said at once.
        o.failed("disk full");
        let said = lines.take();
        assert_eq!(said.len(), 1, "{said:#?}");
        assert!(
            said[0].starts_with("WARN cannot claim due deliveries error=disk full"),
            "{}",
            said[0]
        );
    }

    /// A task that flaps: its first failure and first success are said,
    /// the flaps after them only in the next line, a minute later.
    #[tokio::test(start_paused = true)]
    async fn a_flapping_task_is_said_once_a_minute() {
        let lines = Lines::default();
        let _guard = tracing::subscriber::set_default(lines.subscriber());
        let mut o = Outage::new("accept failed", "connections are accepted again");
        for _ in 0..100 {
            o.failed("Too many open files");
            tokio::time::advance(Duration::from_millis(50)).await;
            o.succeeded();
            tokio::time::advance(Duration::from_millis(50)).await;
        }
        let said = lines.take();
        assert_eq!(said.len(), 2, "{said:#?}");
        assert!(
            said[0].starts_with("WARN accept failed error=Too many"),
            "{}",
            said[0]
        );
        assert!(
            said[1].starts_with("INFO connections are accepted again after 1 failures in 0.1 s"),
            "{}",
            said[1]
        );
        tokio::time::advance(REMIND).await;
        o.failed("Too many open files");
        o.succeeded();
        let said = lines.take();
        assert_eq!(said.len(), 2, "{said:#?}");
        assert!(
            said[0].starts_with(
                "WARN accept failed, again: 100 failures in 1 min 9 s since the last line"
            ),
            "{}",
            said[0]
        );
        assert!(
            said[1].contains("after 100 failures in 1 min 9 s"),
            "{}",
            said[1]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_errors() {
        let lines = Lines::default();
        let _guard = tracing::subscriber::set_default(lines.subscriber());
        let mut o = Outage::errors(
            "cannot write to the database",
            "the database takes writes again",
        );
        o.failed("locked");
        let said = lines.take();
        assert!(
            said[0].starts_with("ERROR cannot write to the database error=locked"),
            "{said:?}"
        );
    }

    /// The lines logged, as "LEVEL message field=value…".
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Lines {
        fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
            let me = self.clone();
            tracing_subscriber::fmt()
                .with_writer(move || me.clone())
                .without_time()
                .with_target(false)
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .finish()
        }

        fn take(&self) -> Vec<String> {
            let bytes = std::mem::take(&mut *self.0.lock().expect("lines"));
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(|l| l.trim_start().to_string())
                .collect()
        }
    }

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
