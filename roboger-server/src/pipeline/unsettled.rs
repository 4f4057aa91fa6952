//! What the writer (and the sweeper, for its claims) still has to set
//! right in the database after writes it saw fail, once the database
//! answers again.
//!
//! - The leases of deliveries whose outcomes it gave up on are freed, so
//!   that they are made again: this node's lease renewal would otherwise
//!   keep them its own for good. So are those of a claim of due
//!   deliveries (the sweeper's, which keeps a list of its own) whose
//!   `COMMIT` may have taken effect though its answer was lost; the
//!   freeing waits for the claim's row locks while that `COMMIT` runs.
//! - The events of a group commit it saw fail are deleted if they are
//!   there after all, untried. Their pushes were told 503, which says
//!   "stored nowhere, send again"; but a commit whose answer was lost
//!   (its connection broke after the database had it) may have taken
//!   effect, and its deliveries, leased to this node and never handed to
//!   the dispatcher, were made at the node's next start: a sender that
//!   sent again got its event twice, hours later. They are looked for
//!   only once the commit can no longer be running: the writer's timeout
//!   after the failure (on PostgreSQL the commit's own statement timeout
//!   is shorter; SQLite and MySQL make a reader wait for a commit that
//!   still holds its rows).
//!
//! Only a commit that may have taken effect is remembered: not one the
//! database answered with an error, nor one that found no connection.
//!
//! Invariant: each list is bounded ([`REMEMBERED_MAX`]); what is past the
//! bound stays leased to this node until it restarts (and is made then),
//! as the log says. Each try is bounded too ([`WITHDRAW_SLICE`] events),
//! so that after a long outage the writer, which waits for it, is not
//! held by more than a short transaction a second.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::outage::Outage;
use crate::store::Store;

/// Most deliveries, and most events, the writer remembers to set right.
const REMEMBERED_MAX: usize = 65_536;
/// How often the writer tries again while the database does not answer.
pub(super) const RETRY: Duration = Duration::from_secs(1);
/// Most events of failed commits looked for in one try.
const WITHDRAW_SLICE: usize = 512;

/// A list of what to set right, the writer's or the sweeper's (see the
/// module's docs).
pub(super) struct Unsettled {
    /// Deliveries (event id, endpoint id) whose leases are to be freed.
    lost: Vec<(String, i64)>,
    /// The events of failed commits, each with when to look for it, in
    /// that order.
    doubtful: VecDeque<(Instant, String)>,
    /// Whether the log says `doubtful` is full.
    overflowing: bool,
    tried_at: Instant,
    /// What the log says of the tries that fail: while the database is
    /// down every try fails, and under a flapping network one in a few.
    outage: Outage,
}

impl Unsettled {
    /// A list whose failed tries the log says as `failing`, and their end
    /// as `again` (each list's own: the writer's, the sweeper's).
    pub(super) fn new(failing: &'static str, again: &'static str) -> Unsettled {
        Unsettled {
            lost: Vec::new(),
            doubtful: VecDeque::new(),
            overflowing: false,
            tried_at: Instant::now(),
            outage: Outage::new(failing, again),
        }
    }

    /// Whether anything waits to be set right, or the end of failed
    /// tries to be said (once tries have worked for a while).
    pub(super) fn waiting(&self) -> bool {
        !self.lost.is_empty() || !self.doubtful.is_empty() || self.outage.said()
    }

    /// Deliveries `keys` are leased to this node with nothing to end
    /// their leases: their outcomes were given up on, or a claim that
    /// failed may hold them.
    pub(super) fn free_later(&mut self, keys: Vec<(String, i64)>) {
        let room = REMEMBERED_MAX.saturating_sub(self.lost.len());
        if keys.len() > room {
            tracing::warn!(
                deliveries = keys.len() - room,
                "too many deliveries to free to remember: those stay leased to this server \
                 until it restarts"
            );
        }
        self.lost.extend(keys.into_iter().take(room));
    }

    /// A commit of events `ids` failed: they are looked for once it can
    /// no longer be running, `timeout` from now.
    pub(super) fn commit_failed(&mut self, ids: Vec<String>, timeout: Duration) {
        let room = REMEMBERED_MAX.saturating_sub(self.doubtful.len());
        if ids.len() > room && !self.overflowing {
            self.overflowing = true;
            tracing::warn!(
                "too many events of failed commits to remember: any of those left out that were \
                 stored after all stay leased to this server until it restarts, and are \
                 delivered then"
            );
        }
        let due = Instant::now() + timeout;
        self.doubtful
            .extend(ids.into_iter().take(room).map(|id| (due, id)));
    }

    /// Sets right what is due, at most every [`RETRY`]; what the
    /// database does not take is kept for the next try.
    pub(super) async fn retry(&mut self, store: &Store, instance: &str, timeout: Duration) {
        if !self.waiting() || self.tried_at.elapsed() < RETRY {
            return;
        }
        self.tried_at = Instant::now();
        if self.lost.is_empty() && self.doubtful.is_empty() {
            // Nothing left, but failures said: a run that works.
            self.outage.succeeded();
            return;
        }
        // A database that does not take the one is not asked the other.
        if !self.lost.is_empty() && !self.free_lost(store, instance, timeout).await {
            return;
        }
        if self
            .doubtful
            .front()
            .is_some_and(|(due, _)| *due <= Instant::now())
        {
            self.withdraw(store, instance, timeout).await;
        }
    }

    /// Frees the leases of the deliveries in `lost` so that they are made
    /// (again); whether the database took it.
    async fn free_lost(&mut self, store: &Store, instance: &str, timeout: Duration) -> bool {
        match tokio::time::timeout(timeout, store.release_leases_of(instance, &self.lost)).await {
            Ok(Ok(n)) => {
                // None when a failed claim had not taken effect after all.
                if n > 0 {
                    tracing::info!(
                        deliveries = n,
                        "the deliveries a failed write left leased to this server are free to \
                         be made again"
                    );
                }
                self.lost.clear();
                self.outage.succeeded();
                true
            }
            Ok(Err(e)) => {
                self.outage.failed(format_args!("freeing leases: {e}"));
                false
            }
            Err(_) => {
                self.outage.failed("freeing leases: timed out");
                false
            }
        }
    }

    /// Deletes those of the events of failed commits now due (at most
    /// [`WITHDRAW_SLICE`]) that were stored after all.
    async fn withdraw(&mut self, store: &Store, instance: &str, timeout: Duration) {
        let now = Instant::now();
        let ids: Vec<String> = self
            .doubtful
            .iter()
            .take_while(|(due, _)| *due <= now)
            .take(WITHDRAW_SLICE)
            .map(|(_, id)| id.clone())
            .collect();
        match tokio::time::timeout(timeout, store.withdraw_events(instance, &ids)).await {
            Ok(Ok(n)) => {
                if n > 0 {
                    tracing::warn!(
                        events = n,
                        "events of a commit that failed were stored after all (its answer was \
                         lost); their pushes were answered 503, so they are deleted, not \
                         delivered"
                    );
                }
                self.doubtful.drain(..ids.len());
                self.overflowing &= !self.doubtful.is_empty();
                self.outage.succeeded();
            }
            Ok(Err(e)) => self.outage.failed(format_args!(
                "looking for the events of failed commits: {e}"
            )),
            Err(_) => self
                .outage
                .failed("looking for the events of failed commits: timed out"),
        }
    }
}
