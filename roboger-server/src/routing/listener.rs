//! The routing change listener (PostgreSQL): `LISTEN` on a connection of
//! its own, which wakes [`super::follow`] as soon as another node
//! announces a change, instead of at its next poll.
//!
//! A connection can fall silent with no error ever reaching its end: a
//! NAT or a firewall drops it while it is idle, or its server vanishes
//! with no reset. A listener on it would hear nothing for good, and the
//! node would learn of changes by its one-second poll alone; since a
//! change is answered once every node obeys it, each would wait up to
//! that second. So every [`PROBE_EVERY`] the node announces a probe of
//! its own through its pool, and a listener that has not heard it within
//! `timeout` is given up for a new one on a new connection. The probes
//! also keep an idle path's state alive. While the listener cannot be
//! trusted (no connection, or a probe unheard), the node polls as often
//! as it does where there is no `NOTIFY`.
//!
//! Invariant: only a payload that is not a probe (a change's version)
//! wakes the catch-up; every node hears every node's probes, and ignores
//! all but its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::outage::Outage;
use crate::store::{self, ROUTING_CHANNEL, Store};

/// How often a node probes its listener.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// How long the listener waits after an error before it tries again.
const RETRY: Duration = Duration::from_secs(1);

/// A listener for routing changes, probed.
pub struct Listener {
    store: Store,
    told: Arc<Notify>,
    /// This node's instance: what its probes carry.
    me: String,
    timeout: Duration,
    /// The task receiving notifications, once there is a connection.
    task: Option<JoinHandle<()>>,
    /// The newest of this node's probes the listener heard.
    heard: Arc<AtomicU64>,
    /// How many probes were sent: the newest one's number.
    probes: u64,
    /// When the newest probe was sent, while it is awaited.
    awaited: Option<Instant>,
    /// When the next probe (or, with no connection, the next try to
    /// listen) is due.
    next: Instant,
    /// Probes that went unheard.
    deaf: Outage,
    /// Tries to listen that failed.
    absent: Outage,
}

impl Listener {
    /// Listens on a new connection, or, when none can be had now, tries
    /// again every [`PROBE_EVERY`]; the listener wakes `told` at each
    /// change announced. `me` is this node's instance.
    pub async fn start(store: Store, told: Arc<Notify>, me: String, timeout: Duration) -> Listener {
        let mut l = Listener {
            store,
            told,
            me,
            timeout,
            task: None,
            heard: Arc::new(AtomicU64::new(0)),
            probes: 0,
            awaited: None,
            next: Instant::now() + PROBE_EVERY,
            deaf: Outage::new(
                "the routing change listener did not hear this node's probe; listening on a \
                 new connection (changes are polled every 50 ms meanwhile)",
                "the routing change listener hears again",
            ),
            absent: Outage::new(
                "cannot listen for routing changes; polling every 50 ms meanwhile",
                "listening for routing changes again",
            ),
        };
        l.listen().await;
        l
    }

    /// Whether changes may be left to the listener (with the one-second
    /// poll as a safety net): it listens, and its last probe was heard.
    pub fn hears(&self) -> bool {
        self.task.is_some() && !self.deaf.said() && !self.absent.said()
    }

    /// Called at each of the follower's turns: sends a probe when one is
    /// due, listens on a new connection when the last probe was not heard
    /// within `timeout`, and tries to listen again when it could not.
    pub async fn check(&mut self) {
        // A listener that heard its probe after an outage is said to hear
        // again once it has for `outage::SETTLE`.
        self.deaf.idle();
        self.absent.idle();
        if let Some(sent) = self.awaited {
            if self.heard.load(Ordering::Acquire) >= self.probes {
                self.awaited = None;
                self.deaf.succeeded();
            } else if sent.elapsed() >= self.timeout {
                self.awaited = None;
                self.deaf.failed(format_args!(
                    "probe {} unheard after {}s",
                    self.probes,
                    self.timeout.as_secs_f64()
                ));
                self.listen().await;
            }
            return;
        }
        if Instant::now() < self.next {
            return;
        }
        if self.task.is_none() {
            self.listen().await;
            if self.task.is_none() {
                self.next = Instant::now() + PROBE_EVERY;
            }
            return;
        }
        self.probes += 1;
        let payload = probe(&self.me, self.probes);
        let sent = Instant::now();
        self.next = sent + PROBE_EVERY;
        match store::within(self.timeout, self.store.notify(ROUTING_CHANNEL, &payload)).await {
            Ok(()) => self.awaited = Some(sent),
            // The database does not answer: the pool's own outage says
            // so, and the next probe is sent in its turn.
            Err(e) => tracing::debug!(error = %e, "cannot probe the routing change listener"),
        }
    }

    /// Listens on a new connection, in place of the listener there was
    /// (its task aborted), which is probed at once. Keeps the old one
    /// when a new one cannot be had.
    async fn listen(&mut self) {
        match store::within(
            self.timeout,
            self.store.listen(ROUTING_CHANNEL, self.timeout),
        )
        .await
        {
            Ok(l) => {
                if let Some(old) = self.task.take() {
                    old.abort();
                }
                self.task = Some(tokio::spawn(hear(
                    l,
                    self.told.clone(),
                    self.me.clone(),
                    self.heard.clone(),
                )));
                self.absent.succeeded();
                self.next = Instant::now();
                // What was announced meanwhile is in the change log.
                self.told.notify_one();
            }
            Err(e) => self.absent.failed(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The payload of `me`'s probe number `seq`.
fn probe(me: &str, seq: u64) -> String {
    format!("probe {me} {seq}")
}

/// What a payload is to the node `me`.
#[derive(Debug, PartialEq)]
enum Heard {
    /// This node's probe, by its number.
    Mine(u64),
    /// Another node's probe.
    Theirs,
    /// A change.
    Change,
}

fn heard_as(payload: &str, me: &str) -> Heard {
    let Some(rest) = payload.strip_prefix("probe ") else {
        return Heard::Change;
    };
    match rest.rsplit_once(' ') {
        Some((who, seq)) if who == me => seq.parse().map_or(Heard::Theirs, Heard::Mine),
        _ => Heard::Theirs,
    }
}

/// Receives notifications until aborted (`try_recv` is not cancel-safe,
/// so it runs alone in its task): wakes `told` at each change, and marks
/// `me`'s probes `heard`.
async fn hear(mut l: PgListener, told: Arc<Notify>, me: String, heard: Arc<AtomicU64>) {
    // A reconnection that works waits for the next notification: the
    // outage is said to end at one heard 3 s or more after the first one
    // after it.
    let mut outage = Outage::new(
        "routing change listener failed",
        "the routing change listener is told of changes again",
    );
    loop {
        match l.try_recv().await {
            Ok(Some(n)) => {
                outage.succeeded();
                match heard_as(n.payload(), &me) {
                    Heard::Mine(seq) => {
                        heard.fetch_max(seq, Ordering::AcqRel);
                    }
                    Heard::Theirs => {}
                    Heard::Change => told.notify_one(),
                }
            }
            // Its connection was lost, and the next call reconnects: what
            // was announced meanwhile is in the log, which the next
            // catch-up reads.
            Ok(None) => {
                tracing::info!("routing change listener lost its connection; reconnecting");
                told.notify_one();
            }
            Err(e) => {
                outage.failed(e);
                tokio::time::sleep(RETRY).await;
                told.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_tells_its_own_probes_from_others_and_from_changes() {
        let me = "web 1#Xk3";
        assert_eq!(heard_as(&probe(me, 7), me), Heard::Mine(7));
        assert_eq!(heard_as(&probe("web 2#Ab9", 7), me), Heard::Theirs);
        assert_eq!(heard_as("probe web", me), Heard::Theirs);
        assert_eq!(heard_as("42", me), Heard::Change);
    }
}
