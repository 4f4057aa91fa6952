//! Deletions of history (an address's, an endpoint's, everything), which
//! may outlast the request that asked for them and be answered 202.
//!
//! Each is recorded in the database before its walk begins, taken by this
//! node's instance, and its record is deleted in the transaction that
//! ends it (`store::deletion`). One that this node gave up on (the
//! database out of reach past a walk's patience) is let go; one whose
//! node stopped or died under it stays taken by an instance that is no
//! longer alive. Either is taken up and made by the next node to look:
//! each node looks every `node-timeout` (the first look one `node-timeout`
//! after its start, so that a crashed instance before it is seen dead;
//! the pause doubling, up to five minutes, while looks or the deletions
//! they take up fail), and at each cleanup it runs. So a deletion once
//! answered 202 is made, whatever stops under it, within about two
//! `node-timeout`s of its node's end; one answered with its error is
//! forgotten ([`Deletions::forget`]) and not made later.
//!
//! Two nodes never make one recorded deletion at once but by a race that
//! is harmless: a take names the instance that held it as read, and the
//! transaction that ends a deletion changes nothing when its record is
//! gone.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cluster::Node;
use crate::store::{self, Begun, Deleting, Recorded, Store, StoreError};

/// The longest pause between a node's looks for deletions left unmade,
/// reached while the looks or the deletions they take up keep failing
/// (the database out of reach, or refusing them): each failure is said in
/// the log, and at the usual pause of `node-timeout` that would be a
/// warning every few seconds.
const LOOK_PAUSE_MOST: Duration = Duration::from_secs(300);

/// What [`Deletions::begin`] did.
pub enum Begin<W> {
    /// Recorded (its record's id), and to be made by running `W`.
    Made(i64, W),
    /// Not recorded: a deletion recorded before covers it.
    Covered(Deleting),
}

/// This node's deletions: those it makes now, and the recorded ones it
/// takes up.
#[derive(Clone, Debug)]
pub struct Deletions {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    node: Arc<Node>,
    /// Each statement's bound outside a walk's (the `timeout`).
    timeout: Duration,
    node_timeout: Duration,
    /// The records of the deletions this node makes now.
    running: Mutex<HashSet<i64>>,
    /// Held (shared) by each begin from before its record is written
    /// until it is in `running`, and (alone) by a look for deletions left
    /// unmade: a look never finds a record this node is beginning and
    /// takes it up, to make it twice.
    beginning: tokio::sync::RwLock<()>,
}

/// A deletion this node makes now, in [`Inner::running`] until dropped.
struct Making<'a> {
    inner: &'a Inner,
    id: i64,
}

impl Drop for Making<'_> {
    fn drop(&mut self) {
        self.inner.running_set().remove(&self.id);
    }
}

impl Deletions {
    pub fn new(
        store: Store,
        node: Arc<Node>,
        timeout: Duration,
        node_timeout: Duration,
    ) -> Deletions {
        Deletions {
            inner: Arc::new(Inner {
                store,
                node,
                timeout,
                node_timeout,
                running: Mutex::new(HashSet::new()),
                beginning: tokio::sync::RwLock::new(()),
            }),
        }
    }

    /// Records `what` as this node's to delete, and returns its record's
    /// id and the deletion to be run: once recorded, it is made even if
    /// this node stops under it, unless [`Deletions::forget`] is told.
    /// Or the recorded deletion that covers it, asked for before and under
    /// way on some node or left to be taken up: `what` is then not
    /// recorded. The caller has checked that what it deletes exists.
    pub async fn begin(
        &self,
        what: Deleting,
    ) -> Result<Begin<impl Future<Output = Result<(), StoreError>> + Send + 'static>, StoreError>
    {
        let inner = self.inner.clone();
        let beginning = inner.beginning.read().await;
        let begun = store::within(
            inner.timeout,
            inner.store.deletion_begin(what, &inner.node.instance),
        )
        .await?;
        let d = match begun {
            Begun::Recorded(d) => d,
            Begun::Covered(before) => return Ok(Begin::Covered(before)),
        };
        inner.running_set().insert(d.id);
        drop(beginning);
        Ok(Begin::Made(d.id, async move { inner.make(d).await }))
    }

    /// Forgets the recorded deletion `id`, which failed: it is not to be
    /// made later. False when its record could not be deleted: it is
    /// then taken up as any other left unmade, and made later.
    pub async fn forget(&self, id: i64) -> bool {
        let inner = &self.inner;
        match store::within(inner.timeout, inner.store.deletion_forget(id)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "a deletion that failed could not be forgotten; it is taken up again later");
                false
            }
        }
    }

    /// How many deletions this node makes now.
    pub fn running(&self) -> usize {
        self.inner.running_set().len()
    }

    /// Takes up and makes, one after the other, the recorded deletions
    /// that no live node makes: left by a node that stopped or died
    /// under them, or given up on. Says in the log what it takes up.
    /// False when the look, a take or a deletion failed.
    pub async fn take_up(&self) -> bool {
        let inner = &self.inner;
        let me = inner.node.instance.as_str();
        let left = {
            let _no_beginning = inner.beginning.write().await;
            let look = inner.store.deletions_left(me, inner.node_timeout);
            match store::within(inner.timeout, look).await {
                Ok(left) => {
                    let running = inner.running_set();
                    left.into_iter()
                        .filter(|d| !(d.taken_by(me) && running.contains(&d.id)))
                        .collect::<Vec<_>>()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not look for deletions left unmade");
                    return false;
                }
            }
        };
        let mut all_made = true;
        for d in left {
            match store::within(inner.timeout, inner.store.deletion_take(&d, me)).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "could not take up a deletion left unmade");
                    return false;
                }
            }
            // Another look of this node's (the cleanup's) took it since.
            if !inner.running_set().insert(d.id) {
                continue;
            }
            tracing::info!(what = ?d.what, "taking up a deletion left unmade");
            if inner.make(d.clone()).await.is_ok() {
                tracing::info!(what = ?d.what, "a deletion left unmade has ended");
            } else {
                all_made = false;
            }
        }
        all_made
    }

    /// [`Deletions::take_up`] every `node-timeout`, until the task is
    /// aborted; the first look one `node-timeout` after this node's start,
    /// when an instance of it that crashed is seen dead. While looks fail
    /// the pause doubles, up to [`LOOK_PAUSE_MOST`].
    pub fn spawn_periodic(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let every = this.inner.node_timeout;
            let mut pause = every;
            loop {
                tokio::time::sleep(pause).await;
                pause = if this.take_up().await {
                    every
                } else {
                    (pause * 2).min(LOOK_PAUSE_MOST.max(every))
                };
            }
        })
    }
}

impl Inner {
    fn running_set(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        match self.running.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Makes the recorded deletion `d`, which this node has taken (it is in
    /// `running`); lets it go when it fails.
    async fn make(&self, d: Recorded) -> Result<(), StoreError> {
        let _making = Making {
            inner: self,
            id: d.id,
        };
        let made = self.store.deletion_make(&d).await;
        if let (Ok(()), Deleting::Everything(up_to)) = (&made, d.what) {
            // Said by whichever node ends it, the one asked or one that
            // took it up.
            tracing::warn!(
                up_to,
                "core delete-everything: every address was deleted (those made since it was asked for are kept)"
            );
        }
        if let Err(e) = &made {
            tracing::warn!(
                what = ?d.what,
                error = %e,
                "a deletion failed; unless it was answered so, it is taken up again (each node looks every node-timeout, less often while deletions fail)"
            );
            let me = self.node.instance.as_str();
            if let Err(e) = store::within(self.timeout, self.store.deletion_let_go(d.id, me)).await
            {
                tracing::debug!(error = %e, "a deletion that failed is not let go");
            }
        }
        made
    }
}
