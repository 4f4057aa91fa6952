//! How a task that runs again and again (a heartbeat, a claim of due
//! deliveries, a group commit, the accept loop) says that it keeps
//! failing: its first failure at once, then at most one line a minute
//! with how many failures there were since, and one line once it works
//! again, with how long it did not.
//!
//! While the database cannot be reached every such task fails several
//! times a second; logged each time, an outage of an hour would be tens of
//! thousands of lines, burying its first cause and filling the journal.
//! A task may also flap: out of file descriptors, each closed connection
//! lets one more in; on a full disk, a commit that needs no new page
//! goes through. So a task is said to work again only once it has worked
//! for [`SETTLE`] without a failure (said at its first run after that);
//! until then its failures are those of the outage already said.
//! A task keeps one [`Outage`] and reports each of its runs to it; a
//! task that runs only while it has work reports its idle time too
//! ([`Outage::idle`]), or its end would wait for its next work.
//!
//! Invariant: a failure is logged, with its error, unless the log's last
//! line of the task says it fails; a task is said to work again only
//! after it has run without failing for `SETTLE` (idle time after a run
//! that worked counts).

use std::fmt::Display;
use std::time::Duration;

use tokio::time::Instant;

/// How often a failure that goes on is said again.
pub const REMIND: Duration = Duration::from_secs(60);

/// How long a task that failed must work without a failure to be said to
/// work again.
pub const SETTLE: Duration = Duration::from_secs(3);

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
    /// The outage the log says goes on, if it says so.
    said: Option<Said>,
}

#[derive(Debug)]
struct Said {
    /// Its first failure.
    since: Instant,
    failures: u64,
    /// Its last line, and the failures since.
    line: Instant,
    unsaid: u64,
    /// Since when the task has worked without a failure.
    working: Option<Instant>,
}

impl Outage {
    /// A task whose failures are warnings.
    pub const fn new(failing: &'static str, again: &'static str) -> Self {
        Outage {
            failing,
            again,
            error: false,
            said: None,
        }
    }

    /// A task whose failures are errors (what users are refused for).
    pub const fn errors(failing: &'static str, again: &'static str) -> Self {
        Outage {
            error: true,
            ..Outage::new(failing, again)
        }
    }

    /// Whether the log says the task fails (its end not yet said): a task
    /// that runs only while it has work keeps running while this holds,
    /// so that its end is said.
    pub fn said(&self) -> bool {
        self.said.is_some()
    }

    /// Reports a failed run: logged when it starts an outage, or
    /// [`REMIND`] after the outage's last line, with the failures since.
    pub fn failed(&mut self, error: impl Display) {
        let now = Instant::now();
        let Some(s) = self.said.as_mut() else {
            self.said = Some(Said {
                since: now,
                failures: 1,
                line: now,
                unsaid: 0,
                working: None,
            });
            self.say(format_args!("{}", self.failing), &error, 1);
            return;
        };
        s.failures += 1;
        s.working = None;
        if now.duration_since(s.line) < REMIND {
            s.unsaid += 1;
            return;
        }
        let (failures, lasted, unsaid) = (s.failures, now.duration_since(s.since), s.unsaid + 1);
        s.line = now;
        s.unsaid = 0;
        self.say(
            format_args!(
                "{}, still: {} in {}, {unsaid} of them since the last line",
                self.failing,
                count(failures),
                seconds(lasted)
            ),
            &error,
            failures,
        );
    }

    /// Reports a run that worked: it ends the outage, and says so, once
    /// the task has worked for [`SETTLE`] without a failure.
    pub fn succeeded(&mut self) {
        let Some(s) = self.said.as_mut() else {
            return;
        };
        let now = Instant::now();
        let working = *s.working.get_or_insert(now);
        if now.duration_since(working) < SETTLE {
            return;
        }
        tracing::info!(
            failures = s.failures,
            "{} after {} in {}",
            self.again,
            count(s.failures),
            seconds(working.duration_since(s.since))
        );
        self.said = None;
    }

    /// Reports that the task has nothing to run: time without work after
    /// a run that worked counts as working, so that a task that runs
    /// only while it has work says its end once it has been idle for
    /// [`SETTLE`] after such a run (not after one that failed).
    pub fn idle(&mut self) {
        if self.said.as_ref().is_some_and(|s| s.working.is_some()) {
            self.succeeded();
        }
    }

    fn say(&self, message: std::fmt::Arguments<'_>, error: &impl Display, failures: u64) {
        if self.error {
            tracing::error!(error = %error, failures, "{message}");
        } else {
            tracing::warn!(error = %error, failures, "{message}");
        }
    }
}

/// "1 failure", "2 failures".
fn count(failures: u64) -> String {
    match failures {
        1 => "1 failure".to_string(),
        n => format!("{n} failures"),
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
        let (lines, _guard) = Lines::capture();
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
        // It works; said once it has for SETTLE, at the run after.
        for _ in 0..13 {
            o.succeeded();
            tokio::time::advance(Duration::from_millis(250)).await;
        }
        let said = lines.take();
        assert_eq!(said.len(), 4, "{said:#?}");
        assert!(
            said[0].starts_with("WARN cannot claim due deliveries error=pool timed out"),
            "{}",
            said[0]
        );
        assert!(
            said[1].starts_with(
                "WARN cannot claim due deliveries, still: 241 failures in 1 min 0 s, 240 of them \
                 since the last line"
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
        // The next failure is a new outage, said at once; its end counts
        // one failure.
        o.failed("disk full");
        o.succeeded();
        tokio::time::advance(SETTLE).await;
        o.succeeded();
        let said = lines.take();
        assert_eq!(said.len(), 2, "{said:#?}");
        assert!(
            said[1].starts_with("INFO due deliveries are claimed again after 1 failure in 0.0 s"),
            "{}",
            said[1]
        );
        assert!(
            said[0].starts_with("WARN cannot claim due deliveries error=disk full"),
            "{}",
            said[0]
        );
    }

    /// A task that flaps is one outage: its first failure is said, the
    /// flaps only in the minute's line, and its end once it has worked for
    /// SETTLE.
    #[tokio::test(start_paused = true)]
    async fn a_flapping_task_is_one_outage() {
        let (lines, _guard) = Lines::capture();
        let mut o = Outage::new("accept failed", "connections are accepted again");
        for _ in 0..700 {
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
            said[1].starts_with("WARN accept failed, still: 601 failures in 1 min 0 s"),
            "{}",
            said[1]
        );
        o.succeeded();
        tokio::time::advance(SETTLE).await;
        assert!(lines.take().is_empty(), "said before a run after SETTLE");
        o.succeeded();
        let said = lines.take();
        assert_eq!(said.len(), 1, "{said:#?}");
        assert!(
            said[0]
                .starts_with("INFO connections are accepted again after 700 failures in 1 min 9 s"),
            "{}",
            said[0]
        );
    }

    /// A task that runs only while it has work says its end once it has
    /// been idle for SETTLE after a run that worked; not after a run that
    /// failed, which leaves it unknown whether it works.
    #[tokio::test(start_paused = true)]
    async fn an_idle_task_says_its_end_after_a_run_that_worked() {
        let (lines, _guard) = Lines::capture();
        let mut o = Outage::new("cannot write", "writes again");
        o.failed("connection reset");
        tokio::time::advance(SETTLE).await;
        o.idle();
        assert_eq!(lines.take().len(), 1, "only the failure");
        o.succeeded();
        tokio::time::advance(SETTLE / 2).await;
        o.idle();
        assert!(lines.take().is_empty(), "said before SETTLE");
        tokio::time::advance(SETTLE / 2).await;
        o.idle();
        let said = lines.take();
        assert_eq!(said.len(), 1, "{said:#?}");
        assert!(
            said[0].starts_with("INFO writes again after 1 failure"),
            "{}",
            said[0]
        );
        assert!(!o.said());
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_errors() {
        let (lines, _guard) = Lines::capture();
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
        /// The lines this thread logs from now until the guard is dropped.
        fn capture() -> (Lines, tracing::subscriber::DefaultGuard) {
            let lines = Lines::default();
            let guard = tracing::subscriber::set_default(lines.subscriber());
            (lines, guard)
        }

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
