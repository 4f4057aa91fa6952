//! Core cleanup: deletions left unmade taken up (`deletion`), expired
//! bucket objects, events past their retention (with nothing pending) and
//! expired console sessions deleted, then every plugin's `cleanup` run. It runs every `cleanup-interval` on one node of
//! the cluster, and on the management API's `cleanup` command.
//!
//! A node runs one cleanup at a time, in a task of its own: a command
//! whose caller stops waiting does not cut it short, and a command that
//! comes while one runs waits for that one instead of starting another.
//! However many events are due, the store deletes them a chunk at a time
//! (`Store::events_cleanup`), so a cleanup's memory does not grow with
//! them; it may take a while, which is why it outlives its callers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::{self, Node};
use crate::deletion::Deletions;
use crate::store::{self, Store, StoreError};
use crate::supervisor::Supervisor;

/// How a cleanup ended. A failure is logged by the cleanup itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed,
}

/// This node's cleanups: the one running, if any, and the periodic task.
#[derive(Clone, Debug)]
pub struct Cleanup {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    plugins: Arc<Supervisor>,
    /// Deletions left unmade, taken up first.
    deletions: Deletions,
    retention: Duration,
    /// How long the database may take to answer each statement (whether
    /// this node takes a period's turn, each step of a cleanup).
    timeout: Duration,
    /// The cleanup running or last run: its task, and where its outcome
    /// appears.
    running: Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    task: JoinHandle<()>,
    outcome: watch::Receiver<Option<Outcome>>,
}

impl Cleanup {
    pub fn new(
        store: Store,
        plugins: Arc<Supervisor>,
        deletions: Deletions,
        retention: Duration,
        timeout: Duration,
    ) -> Cleanup {
        Cleanup {
            inner: Arc::new(Inner {
                store,
                plugins,
                deletions,
                retention,
                timeout,
                running: Mutex::new(None),
            }),
        }
    }

    /// Starts a cleanup in its own task, unless one is running on this
    /// node; returns where that cleanup's outcome appears.
    pub fn start(&self) -> watch::Receiver<Option<Outcome>> {
        let mut running = match self.inner.running.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(r) = running.as_ref()
            && r.outcome.borrow().is_none()
        {
            return r.outcome.clone();
        }
        let (done, outcome) = watch::channel(None);
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            let outcome = match inner.once().await {
                Ok(()) => Outcome::Done,
                Err(e) => {
                    tracing::warn!(error = %e, "cleanup failed");
                    Outcome::Failed
                }
            };
            done.send_replace(Some(outcome));
        });
        *running = Some(Running {
            task,
            outcome: outcome.clone(),
        });
        outcome
    }

    /// Waits up to `within` for the cleanup `outcome` comes from
    /// ([`Cleanup::start`]): `None` when it is still running.
    pub async fn wait(
        mut outcome: watch::Receiver<Option<Outcome>>,
        within: Duration,
    ) -> Option<Outcome> {
        match tokio::time::timeout(within, outcome.wait_for(Option::is_some)).await {
            Ok(Ok(o)) => *o,
            // The task ended without an outcome: it was stopped.
            Ok(Err(_)) => Some(Outcome::Failed),
            Err(_) => None,
        }
    }

    /// Runs a cleanup every `every` on whichever node of the cluster takes
    /// that interval's turn (`cluster::once`).
    pub fn spawn_periodic(&self, node: Arc<Node>, every: Duration) -> JoinHandle<()> {
        let cleanup = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (store, timeout) = (&cleanup.inner.store, cleanup.inner.timeout);
                if !cluster::once(store, &node, ("cleanup", every), timeout).await {
                    continue;
                }
                let mut outcome = cleanup.start();
                // The outcome is logged by the cleanup; an error here means
                // it was stopped.
                let _ = outcome.wait_for(Option::is_some).await;
            }
        })
    }

    /// Stops the cleanup running on this node, if any (a node stopping).
    /// The chunk being deleted is rolled back; those before it stay done.
    pub fn stop(&self) {
        let running = match self.inner.running.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(r) = running.as_ref() {
            r.task.abort();
        }
    }
}

impl Inner {
    async fn once(&self) -> Result<(), StoreError> {
        self.deletions.take_up().await;
        // Each statement within `timeout`: a cleanup waiting for good on
        // a silent connection would keep every later one from starting.
        let n = store::within(self.timeout, self.store.bucket_cleanup()).await?;
        let before =
            chrono::Utc::now() - chrono::Duration::from_std(self.retention).unwrap_or_default();
        // A chunk at a time, each within `timeout` (`Store::events_cleanup`).
        let events = self.store.events_cleanup(before).await?;
        let now = chrono::Utc::now();
        let sessions = store::within(self.timeout, self.store.sessions_cleanup(now)).await?;
        tracing::info!(
            expired_objects = n,
            old_events = events,
            expired_sessions = sessions,
            "core cleanup"
        );
        self.plugins.cleanup().await;
        Ok(())
    }
}
