//! From an accepted push to each plugin's `send`, with nothing accepted
//! and then lost.
//!
//! - The **writer** takes accepted events and delivery outcomes from two
//!   bounded queues and stores as many as are waiting in one transaction
//!   (group commit); each push is answered only after its event and
//!   deliveries are committed, while the next commit runs (so the
//!   database does not wait for the answers) or at once when nothing
//!   follows it.
//! - The **dispatcher** calls the plugins (bounded concurrency) for the
//!   deliveries just committed, and for due ones the **sweeper** claims
//!   from the database: retries, and whatever a previous run of this
//!   server left pending (its leases are released at start). The
//!   deliveries waiting for one plugin at the same moment go in one
//!   `send_batch` call when the plugin offers it (each keeps its own
//!   outcome); otherwise, and for media, one `send` each.
//!   Outcomes are delivered, pending again after a backoff, or failed
//!   after `max-attempts` or `max-age` (the server's own backoff and
//!   every put-off below end where `max-age` does, so a delivery fails
//!   then, not up to a wait later). Outcomes that cannot be written
//!   are kept while the database is out of reach, however long, and
//!   written once it answers: a delivery made during an outage is not
//!   made again. Those in five writes the database itself refused are
//!   given up on (a lost outcome only repeats a delivery: the writer
//!   frees the leases of the deliveries whose outcomes it gave up on once
//!   the database answers again, since this node's lease renewal would
//!   otherwise keep them for good). The events of a commit
//!   that failed are looked for once it cannot be running, and deleted
//!   if it took effect after all: their pushes were told 503
//!   ([`unsettled`]).
//!   A target that asks for a wait puts its endpoint on hold ([`hold`]):
//!   the endpoint's other deliveries are put off until then, not tried.
//!   A delivery whose plugin is not there to try it (not configured on
//!   this server, or refused or failed until restarted) spends no
//!   attempt: it is put off for [`held_wait`], for a reload, a
//!   restart or another node to deliver. Nor does one whose call was not
//!   made (`CallError::NotMade`: the plugin starting or restarting, or
//!   without room for it): it is put off for the backoff of the attempt
//!   it is on. Nor does one whose endpoint or address the claim reads as
//!   disabled: it is not made, but put off for [`held_wait`];
//!   enabling makes it due at once (`api::manage`). One still untried
//!   when its `max-age` ends fails then, saying so.
//!   The deliveries in flight when their plugin ended are sent alone
//!   next time, to find the event that ends it ([`suspect`]).
//! - Writer and dispatcher wait on each other through their queues, so
//!   the writer never only waits: while it waits for room in the
//!   dispatcher's queue it takes in outcomes ([`Inbox`]), and while too
//!   many of those wait to be written it takes no new push.
//! - [`Pipeline::stop`], at the server's stop: the sweeper claims no
//!   more, the dispatcher starts no call and waits for those in flight,
//!   and the writer takes no push, writes their outcomes and ends once
//!   the last has come. What was not started stays leased to this node,
//!   for `cluster::leave` to hand over.
//!
//! Invariant: a push is answered 202 only after the commit; a delivery
//! leaves `pending` only when the plugin accepted it or refused it for
//! good, its send made alone ended the plugin, or its retries are spent.
//! Deliveries are claimed with leases in this process's instance name
//! (`FOR UPDATE SKIP LOCKED` where available), so several servers on one
//! database never run the same delivery at once, and an outcome is
//! written only while its lease is still this instance's (fencing).

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use roboger_plugin_sdk::protocol::SendArgs;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cluster::Node;
use crate::config::DeliveryConfig;
use crate::event::Event;
use crate::log_budget;
use crate::metrics::{Metrics, Outcome};
use crate::outage::Outage;
use crate::routing::Target;
use crate::store::entity::event;
use crate::store::{
    Attempt, Due, EventHead, GroupCommit, STATE_DELIVERED, STATE_FAILED, STATE_PENDING, Store,
    StoreError, Written, event_bytes,
};
use crate::supervisor::{CallError, RawParams, Supervisor};

mod hold;
mod suspect;
mod unsettled;

use hold::Holds;
use unsettled::Unsettled;

/// Why an event could not be accepted (the push gets a 503, or a 413
/// when it is too large).
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The database refused or failed the commit.
    #[error("cannot store the event: {0}")]
    Store(#[from] StoreError),
    /// The commit did not finish in time, or the server is stopping.
    #[error("the event could not be stored in time")]
    Unavailable,
    /// The address (given back) was deleted through another node before
    /// the commit.
    #[error("addr {0} was deleted")]
    AddrGone(String),
    /// The event's text and media are more bytes than the database takes
    /// in one statement (MySQL's `max_allowed_packet`): this many at most.
    #[error("the event is larger than the database takes ({0} bytes)")]
    TooLarge(usize),
}

/// What the writer tells a push about its event.
#[derive(Debug, Clone)]
enum Stored {
    Yes,
    /// The event's address, which was deleted.
    AddrGone(String),
    Failed(String),
}

/// An event made ready to store ([`Pipeline::ready`]): its row, within
/// what one statement of the database takes.
#[derive(Debug)]
pub struct Ready(event::Model);

impl Ready {
    /// The row that is to be stored.
    pub fn event(&self) -> &event::Model {
        &self.0
    }
}

struct Accept {
    event: event::Model,
    targets: Vec<Target>,
    reply: oneshot::Sender<Stored>,
    claim: Arc<Claim>,
}

/// Who decides a push's fate when its wait runs out as the writer takes
/// its event: the first of the two to move the claim. The writer takes
/// an event into a commit only while its push still waits, and a push
/// whose event was taken waits for that commit instead of answering 503,
/// since its event may yet be stored.
#[derive(Debug, Default)]
struct Claim(AtomicU8);

impl Claim {
    const WAITING: u8 = 0;
    const TAKEN: u8 = 1;
    const ABANDONED: u8 = 2;

    /// The writer takes the event, unless its push gave up first.
    fn take(&self) -> bool {
        self.0
            .compare_exchange(
                Self::WAITING,
                Self::TAKEN,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The push gives up, unless the writer took its event first.
    fn abandon(&self) -> bool {
        self.0
            .compare_exchange(
                Self::WAITING,
                Self::ABANDONED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

/// One delivery to make. The event's media is not held here: the call
/// reads it when it is made, within the plugin's byte budget.
struct Job {
    event: Arc<EventHead>,
    endpoint_id: i64,
    plugin: String,
    config: Arc<Value>,
    /// Attempts made before this one.
    attempts: i32,
    /// In flight when its plugin ended before: sent alone ([`suspect`]).
    suspect: bool,
    /// Its endpoint or its address disabled since it was due: not made.
    disabled: Option<Disabled>,
}

/// What of a claimed delivery is disabled, so that it is not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disabled {
    Endpoint,
    Addr,
}

/// Whether a loop of the pipeline is making progress: the time since
/// work began waiting on it without being done (0: nothing waits). Read
/// by the systemd watchdog ([`Pipeline::stalled`]).
#[derive(Debug, Default)]
struct Progress {
    /// Milliseconds after `epoch` plus one; 0 when idle.
    waiting_since: AtomicU64,
    epoch: OnceLock<Instant>,
}

impl Progress {
    fn now(&self) -> u64 {
        let epoch = self.epoch.get_or_init(Instant::now);
        u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Work is waiting (kept if it already was).
    fn waiting(&self) {
        let now = self.now();
        let _ = self
            .waiting_since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Everything that waited is done.
    fn done(&self) {
        self.waiting_since.store(0, Ordering::Relaxed);
    }

    /// Whether work has been waiting for longer than `limit`.
    fn stalled(&self, limit: Duration) -> bool {
        let since = self.waiting_since.load(Ordering::Relaxed);
        since != 0 && Duration::from_millis(self.now().saturating_sub(since)) > limit
    }
}

/// The progress of the writer and the dispatcher.
#[derive(Debug, Default)]
struct Liveness {
    writer: Progress,
    dispatcher: Progress,
}

/// The running pipeline; cheap to share.
pub struct Pipeline {
    accept_tx: mpsc::Sender<Accept>,
    timeout: Duration,
    /// The store's [`Store::largest_event`].
    largest_event: Option<usize>,
    liveness: Arc<Liveness>,
    /// The writer's and the dispatcher's tasks, in that order; taken by
    /// [`Pipeline::stop`].
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Cancelled by [`Pipeline::stop`]: no more claims, no more calls.
    stopping: CancellationToken,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pipeline")
    }
}

const ACCEPT_QUEUE: usize = 4096;
const COMMIT_BATCH: usize = 512;
const DISPATCH_QUEUE: usize = 8192;
const OUTCOME_BATCH: usize = 512;
/// How many writes the database refuses, none succeeding between them
/// (failures out of its reach do not count), before the writer gives up
/// the outcomes they held.
const REFUSALS_MAX: u32 = 5;
/// The writer's back-off after its n-th failed write in a row: n steps,
/// at most [`BACKOFF_STEPS_MAX`].
const BACKOFF_STEP: Duration = Duration::from_millis(50);
const BACKOFF_STEPS_MAX: u32 = 5;
const SWEEP_BATCH: u64 = 256;
/// Most outcomes taken in early (see [`Inbox`]) with which the writer
/// still takes new pushes.
const EARLY_MAX: usize = DISPATCH_QUEUE;
/// Most deliveries the dispatcher takes from its queue at once, to group
/// those for one plugin into a `send_batch` call.
const BATCH_MAX: usize = 32;

impl Pipeline {
    /// Starts the writer, dispatcher and sweeper tasks.
    pub async fn start(
        store: Store,
        plugins: Arc<Supervisor>,
        cfg: Arc<DeliveryConfig>,
        timeout: Duration,
        node: Arc<Node>,
        metrics: Arc<Metrics>,
    ) -> Pipeline {
        match store.release_leases(&cfg.node).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deliveries = n,
                "resuming deliveries a server of an earlier version left pending"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot release an earlier version's leases"),
        }
        let (accept_tx, accept_rx) = mpsc::channel(ACCEPT_QUEUE);
        let (job_tx, job_rx) = mpsc::channel(DISPATCH_QUEUE);
        let (outcome_tx, outcome_rx) = mpsc::channel(DISPATCH_QUEUE);
        let liveness = Arc::new(Liveness::default());
        let stopping = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(write_loop(
                store.clone(),
                (cfg.clone(), node.clone()),
                timeout,
                (accept_rx, outcome_rx),
                (job_tx.clone(), metrics.clone(), liveness.clone()),
            )),
            tokio::spawn(dispatch_loop(
                (store.clone(), plugins, timeout, node.clone()),
                (cfg.clone(), metrics, liveness.clone()),
                (job_rx, stopping.clone()),
                outcome_tx,
            )),
        ];
        let largest_event = store.largest_event();
        tokio::spawn(sweep_loop(
            store,
            (cfg, timeout),
            node,
            (job_tx, stopping.clone()),
        ));
        Pipeline {
            accept_tx,
            timeout,
            largest_event,
            liveness,
            tasks: std::sync::Mutex::new(tasks),
            stopping,
        }
    }

    /// Stops the pipeline, for the server's shutdown once no push is
    /// being answered: no more claims and no new call; the calls in
    /// flight end (each within the call `timeout`) and their outcomes
    /// are written, so a delivery made is not made again by the node
    /// that takes it over. Waits at most `limit`; returns whether all of
    /// it ended within it. What did not stays leased to this node, for
    /// `cluster::leave` to hand over.
    pub async fn stop(&self, limit: Duration) -> bool {
        self.stopping.cancel();
        let tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => return false,
        };
        tokio::time::timeout(limit, futures_util::future::join_all(tasks))
            .await
            .is_ok()
    }

    /// Which part of the pipeline, if any, has had work waiting for
    /// longer than `limit` (or has ended): `writer` when commits do not
    /// succeed (a frozen database), `dispatcher` when no delivery slot
    /// frees up.
    pub fn stalled(&self, limit: Duration) -> Option<&'static str> {
        let tasks = self.tasks.lock();
        let ended = |i: usize| {
            tasks
                .as_ref()
                .map_or(true, |t| t.get(i).is_none_or(|t| t.is_finished()))
        };
        if ended(0) || self.liveness.writer.stalled(limit) {
            return Some("writer");
        }
        if ended(1) || self.liveness.dispatcher.stalled(limit) {
            return Some("dispatcher");
        }
        None
    }

    /// Makes `event`, pushed to the address `addr_id`, ready to store. An
    /// event larger than one statement of the database takes is refused
    /// here, alone (in a group commit it would fail its neighbours), and
    /// before anything counts it against the address's limits.
    pub fn ready(&self, event: Event, addr_id: i64) -> Result<Ready, AcceptError> {
        let model = event::Model {
            id: event.id,
            addr_id,
            addr: event.addr,
            msg: event.msg,
            subject: event.subject,
            formatted_subject: event.formatted_subject,
            level: i16::from(event.level.code()),
            location: event.location,
            tag: event.tag,
            sender: event.sender,
            media: event.media,
            media_fname: event.media_fname,
            created: chrono::Utc::now(),
            hops: i16::try_from(event.hops).unwrap_or(i16::MAX),
        };
        if let Some(most) = self.largest_event
            && event_bytes(&model) > most
        {
            return Err(AcceptError::TooLarge(most));
        }
        Ok(Ready(model))
    }

    /// Stores `event` with a delivery per target and returns once it is
    /// committed; the deliveries then start at once. Unavailable when the
    /// writer has not taken the event within the timeout (it is then
    /// never stored); once taken, the answer is its commit's.
    pub async fn accept(&self, event: Ready, targets: Vec<Target>) -> Result<(), AcceptError> {
        let (reply, mut rx) = oneshot::channel();
        let claim = Arc::new(Claim::default());
        let queued = self.accept_tx.send(Accept {
            event: event.0,
            targets,
            reply,
            claim: claim.clone(),
        });
        let waited = tokio::time::timeout(self.timeout, async {
            queued.await.map_err(|_| AcceptError::Unavailable)?;
            Ok::<_, AcceptError>((&mut rx).await)
        })
        .await;
        let stored = match waited {
            Ok(stored) => stored?,
            Err(_) if claim.abandon() => return Err(AcceptError::Unavailable),
            // Its commit has begun: that commit answers, within its own
            // timeout, whether the event was stored.
            Err(_) => tokio::time::timeout(self.timeout, rx)
                .await
                .map_err(|_| AcceptError::Unavailable)?,
        };
        match stored {
            Ok(Stored::Yes) => Ok(()),
            Ok(Stored::AddrGone(a)) => Err(AcceptError::AddrGone(a)),
            Ok(Stored::Failed(e)) => Err(AcceptError::Store(StoreError::Db(
                sea_orm::DbErr::Custom(e),
            ))),
            Err(_) => Err(AcceptError::Unavailable),
        }
    }
}

fn lease_until(cfg: &DeliveryConfig) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
        + chrono::Duration::from_std(cfg.lease).unwrap_or(chrono::Duration::seconds(60))
}

async fn write_loop(
    store: Store,
    (cfg, node): (Arc<DeliveryConfig>, Arc<Node>),
    timeout: Duration,
    (mut accepts, outcomes): (mpsc::Receiver<Accept>, mpsc::Receiver<Attempt>),
    (jobs, metrics, liveness): (mpsc::Sender<Job>, Arc<Metrics>, Arc<Liveness>),
) {
    // Outcomes not yet written; how many writes in a row failed (for the
    // back-off), and how many of those the database refused itself.
    let mut recorded: Vec<Attempt> = Vec::new();
    let mut failures = 0u32;
    let mut refusals = 0u32;
    // The dispatcher is gone (the pipeline stops): no more pushes are
    // taken, and the outcomes of the calls still in flight are written
    // until the last of them has come.
    let mut closing = false;
    let mut outage = Outage::errors(
        "cannot write to the database",
        "the database takes writes again",
    );
    // What failed writes left to set right once the database answers:
    // the leases of outcomes given up on, and failed commits' events.
    let mut unsettled = Unsettled::new(
        "cannot set right what failed commits left",
        "what failed commits left is set right again",
    );
    // The last commit's pushes, answered while the next commit runs, or
    // as soon as there is nothing to write next.
    let mut committed: Option<Committed> = None;
    let mut inbox = Inbox {
        outcomes,
        early: Vec::new(),
        open: true,
    };
    loop {
        unsettled.retry(&store, &node.instance, timeout).await;
        let mut batch = Vec::new();
        let room = OUTCOME_BATCH.saturating_sub(recorded.len());
        recorded.extend(inbox.early.drain(..room.min(inbox.early.len())));
        if recorded.is_empty() {
            if accepts.is_empty() && inbox.outcomes.is_empty() {
                if let Some(c) = committed.take() {
                    closing |= settle(c, &jobs, &store, &mut inbox).await.is_err();
                    continue;
                }
                store.writer_waits();
                outage.idle();
            }
            tokio::select! {
                a = accepts.recv(), if !closing => match a {
                    Some(a) => batch.push(a),
                    None => break,
                },
                o = inbox.outcomes.recv() => match o {
                    Some(o) => recorded.push(o),
                    None => break,
                },
                // Idle, with something to set right: back to the top for it.
                _ = tokio::time::sleep(unsettled::RETRY), if unsettled.waiting() => continue,
                // Idle after an outage: back to the top to say its end.
                _ = tokio::time::sleep(crate::outage::SETTLE), if outage.said() => continue,
            }
        }
        liveness.writer.waiting();
        if !closing {
            take_pushes(&mut batch, &mut accepts, &inbox);
        }
        while recorded.len() < OUTCOME_BATCH {
            match inbox.outcomes.try_recv() {
                Ok(o) => recorded.push(o),
                Err(_) => break,
            }
        }
        // A push that stopped waiting has been answered 503 ("not stored
        // in time"), or its client went away: storing its event now would
        // deliver what its sender was told was refused, and will likely
        // send again. The others now wait for this commit, however long it
        // takes ([`Claim`]).
        batch.retain(|a| !a.reply.is_closed() && a.claim.take());
        if batch.is_empty() && recorded.is_empty() {
            if let Some(c) = committed.take() {
                closing |= settle(c, &jobs, &store, &mut inbox).await.is_err();
            }
            liveness.writer.done();
            continue;
        }
        let rows: Vec<(&event::Model, Vec<i64>)> = batch
            .iter()
            .map(|a| (&a.event, a.targets.iter().map(|t| t.endpoint_id).collect()))
            .collect();
        let commit = async {
            let began = Instant::now();
            let written = tokio::time::timeout(
                timeout,
                store.write_batch(&GroupCommit {
                    batch: &rows,
                    outcomes: &recorded,
                    node: &node.instance,
                    lease_until: lease_until(&cfg),
                }),
            )
            .await;
            (written, began.elapsed())
        };
        // The commit is polled first: it runs until its statement is with
        // the database, and the last commit's pushes are answered while
        // the database works on it, instead of in the gap between the
        // two commits that every push waits through.
        let ((written, took), waiting) = match committed.take() {
            Some(c) => tokio::join!(biased; commit, async { answer(c, &jobs) }),
            None => (commit.await, Ok(Vec::new())),
        };
        let handed = match waiting {
            Ok(rest) => wait_for_room(rest, &jobs, &store, &mut inbox).await,
            Err(closed) => Err(closed),
        };
        metrics.commit(rows.len(), took);
        tracing::debug!(
            events = rows.len(),
            outcomes = recorded.len(),
            ?took,
            "group commit"
        );
        drop(rows);
        // A failed commit whose answer was lost may have taken effect.
        let in_doubt = match &written {
            Ok(Ok(_)) => false,
            Ok(Err(e)) => !e.took_no_effect(),
            Err(_) => true,
        };
        // Refused: by the database, or by an error that may be the write's
        // own doing; not out of the database's reach (no connection, one
        // that failed under the write, a commit that outlasted the timeout).
        let refused = matches!(&written, Ok(Err(e)) if !e.out_of_reach());
        let result = match written {
            Ok(Ok(w)) => {
                if w.dropped_outcomes > 0 {
                    said_dropped(&store, &recorded, w.dropped_outcomes, timeout).await;
                }
                Ok(w)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the commit timed out".to_string()),
        };
        match &result {
            Ok(_) => {
                recorded.clear();
                failures = 0;
                refusals = 0;
                outage.succeeded();
                liveness.writer.done();
            }
            Err(e) => {
                outage.failed(format_args!(
                    "{e} (events refused: {}, outcomes waiting: {})",
                    batch.len(),
                    recorded.len()
                ));
                if in_doubt {
                    unsettled
                        .commit_failed(batch.iter().map(|a| a.event.id.clone()).collect(), timeout);
                }
                failures = (failures + 1).min(BACKOFF_STEPS_MAX);
                // Outcomes are given up on only when the database refused
                // five writes that held them: one of them may be what it
                // refuses, and the pushes wait for the same commit. While
                // the database is out of reach they are kept, however long
                // that lasts: giving them up would write nothing else, and
                // only have those deliveries made again once it answers.
                // (The dispatcher waits meanwhile, the queue of outcomes
                // being full.)
                refusals += u32::from(refused);
                if refusals >= REFUSALS_MAX {
                    if !recorded.is_empty() {
                        tracing::warn!(
                            outcomes = recorded.len(),
                            "delivery outcomes dropped; those deliveries will be repeated"
                        );
                    }
                    unsettled.free_later(
                        recorded
                            .drain(..)
                            .map(|o| (o.event_id, o.endpoint_id))
                            .collect(),
                    );
                    refusals = 0;
                }
            }
        }
        let done = Committed { batch, result };
        if handed.is_err() || closing {
            // The dispatcher is gone: this commit's pushes are answered
            // all the same (a 503 for a stored event would be a lie);
            // its deliveries stay pending and leased to this node, for
            // `cluster::leave` to hand over.
            let _ = answer(done, &jobs);
            closing = true;
            if recorded.is_empty() {
                liveness.writer.done();
            } else {
                tokio::time::sleep(BACKOFF_STEP * failures.max(1)).await;
            }
            continue;
        }
        if done.result.is_ok() {
            committed = Some(done);
        } else {
            // Answered at once: the next commit waits for the back-off.
            closing |= settle(done, &jobs, &store, &mut inbox).await.is_err();
            if recorded.is_empty() && accepts.is_empty() {
                // Failed, but nothing waits any more: idle, not stalled.
                liveness.writer.done();
            }
            // Not a hot loop while the database is down.
            tokio::time::sleep(BACKOFF_STEP * failures.max(1)).await;
        }
    }
    // Closing: the last commit's pushes still wait for their answer.
    if let Some(c) = committed.take() {
        let _ = settle(c, &jobs, &store, &mut inbox).await;
    }
}

/// Takes the pushes waiting in `accepts` into `batch`, up to a commit's
/// worth. While more than [`EARLY_MAX`] outcomes taken in early wait in
/// `inbox`, it takes none: commits write those outcomes first, and new
/// pushes, whose deliveries would add more (see [`Inbox`]), wait in their
/// queue.
fn take_pushes(batch: &mut Vec<Accept>, accepts: &mut mpsc::Receiver<Accept>, inbox: &Inbox) {
    while batch.len() < COMMIT_BATCH && inbox.early.len() <= EARLY_MAX {
        match accepts.try_recv() {
            Ok(a) => batch.push(a),
            Err(_) => break,
        }
    }
}

/// A commit's pushes, and how it went.
struct Committed {
    batch: Vec<Accept>,
    result: Result<Written, String>,
}

/// The other end of a pipeline queue is gone (the server is stopping).
struct Closed;

/// Answers a commit's pushes and hands its deliveries to the dispatcher,
/// waiting for room when its queue is full.
async fn settle(
    c: Committed,
    jobs: &mpsc::Sender<Job>,
    store: &Store,
    inbox: &mut Inbox,
) -> Result<(), Closed> {
    let rest = answer(c, jobs)?;
    wait_for_room(rest, jobs, store, inbox).await
}

/// Answers every push of a commit, then offers the deliveries of the
/// events it stored to the dispatcher, without waiting: those that found
/// its queue full are given back, in order. Every push is answered
/// before any of its deliveries is handed over.
fn answer(c: Committed, jobs: &mpsc::Sender<Job>) -> Result<Vec<Job>, Closed> {
    let mut stored = Vec::with_capacity(c.batch.len());
    for a in c.batch {
        match &c.result {
            Err(e) => {
                let _ = a.reply.send(Stored::Failed(e.clone()));
            }
            Ok(w) if w.gone_addrs.contains(&a.event.addr_id) => {
                let _ = a.reply.send(Stored::AddrGone(a.event.addr));
            }
            Ok(w) => {
                let _ = a.reply.send(Stored::Yes);
                let mut targets = a.targets;
                targets.retain(|t| !w.gone_endpoints.contains(&t.endpoint_id));
                stored.push((a.event, targets));
            }
        }
    }
    let mut rest = Vec::new();
    for (event, targets) in stored {
        let event = Arc::new(EventHead::of(event));
        for t in targets {
            let job = Job {
                event: event.clone(),
                endpoint_id: t.endpoint_id,
                plugin: t.plugin,
                config: t.config,
                attempts: 0,
                suspect: false,
                disabled: None,
            };
            if !rest.is_empty() {
                rest.push(job);
                continue;
            }
            match jobs.try_send(job) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Closed),
                Err(mpsc::error::TrySendError::Full(job)) => rest.push(job),
            }
        }
    }
    Ok(rest)
}

/// Says in the log why `dropped` of the `outcomes` a commit held were
/// not written (fencing): those whose delivery was deleted meanwhile
/// with its endpoint or address are gone, and nothing more comes of
/// them; the others were taken by another node or freed, and are made
/// again. The look for what is gone, which only a commit that dropped
/// some makes, is bounded by `timeout`.
async fn said_dropped(store: &Store, outcomes: &[Attempt], dropped: u64, timeout: Duration) {
    let keys: Vec<(String, i64)> = outcomes
        .iter()
        .map(|o| (o.event_id.clone(), o.endpoint_id))
        .collect();
    let gone = match tokio::time::timeout(timeout, store.deliveries_gone(&keys)).await {
        Ok(Ok(gone)) => gone.min(dropped),
        Ok(Err(_)) | Err(_) => 0,
    };
    if gone > 0 {
        tracing::info!(
            outcomes = gone,
            "outcomes of deliveries deleted meanwhile (with their endpoint or address) not written"
        );
    }
    if dropped > gone {
        tracing::warn!(
            outcomes = dropped - gone,
            "late outcomes dropped: those deliveries were no longer leased to this \
             server (their lease was freed after a failed write, or taken over by \
             another node), and are made again; or an earlier commit whose answer \
             was lost had written them already"
        );
    }
}

/// Hands `rest` to the dispatcher, waiting for room in its queue, which
/// can take seconds while deliveries back up behind a slow target: the
/// kept connection goes back to the pool first.
///
/// Meanwhile it takes in the outcomes the dispatcher's tasks hand back
/// (written by the commits that follow): room in the dispatcher's queue
/// is made by tasks that end, and a task ends only once its outcome is
/// queued, so a writer that only waited would wait for good once the
/// outcome queue is full.
async fn wait_for_room(
    rest: Vec<Job>,
    jobs: &mpsc::Sender<Job>,
    store: &Store,
    inbox: &mut Inbox,
) -> Result<(), Closed> {
    if rest.is_empty() {
        return Ok(());
    }
    store.writer_waits();
    for job in rest {
        let room = loop {
            tokio::select! {
                biased;
                room = jobs.reserve() => break room.map_err(|_| Closed)?,
                o = inbox.outcomes.recv(), if inbox.open => match o {
                    Some(o) => inbox.early.push(o),
                    None => inbox.open = false,
                },
            }
        };
        room.send(job);
    }
    Ok(())
}

/// The writer's end of the outcome queue, with the outcomes it took in
/// while it waited to hand deliveries over and has not written yet.
///
/// Invariant: `early` grows only while the writer hands a commit's
/// deliveries over, by the outcomes of deliveries queued or running
/// meanwhile, and the writer takes no new push (whose deliveries would
/// add more) while it holds more than [`EARLY_MAX`]: it stays within
/// that, one commit's deliveries, and what the two queues and the
/// running calls hold.
struct Inbox {
    outcomes: mpsc::Receiver<Attempt>,
    early: Vec<Attempt>,
    /// Until the dispatcher is gone.
    open: bool,
}

/// What every delivery task of the dispatcher shares.
struct Dispatch {
    store: Store,
    plugins: Arc<Supervisor>,
    timeout: Duration,
    cfg: Arc<DeliveryConfig>,
    metrics: Arc<Metrics>,
    outcomes: mpsc::Sender<Attempt>,
    holds: Holds,
    /// This process's instance, whose leases a put-off releases.
    node: Arc<Node>,
}

impl Dispatch {
    /// Makes `jobs` (one, or a batch for one plugin) and hands over each
    /// outcome.
    async fn run(&self, jobs: Vec<Job>) {
        let began = std::time::Instant::now();
        let results = match jobs.as_slice() {
            [job] => vec![attempt(&self.store, &self.plugins, job, self.timeout).await],
            [first, ..] => {
                for j in &jobs {
                    self.plugins.register_secrets(&j.plugin, &j.config);
                }
                let mut events = Vec::with_capacity(jobs.len());
                let mut unencoded = Vec::new();
                for (i, j) in jobs.iter().enumerate() {
                    match send_params(j, None) {
                        Ok(p) => events.push(p.0),
                        Err(e) => unencoded.push((i, e)),
                    }
                }
                let mut results = self.plugins.send_batch(&first.plugin, events).await;
                for (i, e) in unencoded {
                    results.insert(i, Err(e));
                }
                results
            }
            [] => Vec::new(),
        };
        let took = began.elapsed();
        if let Some(first) = jobs.first() {
            self.metrics.call(&first.plugin, jobs.len());
        }
        for (job, result) in jobs.iter().zip(results) {
            if let Err(CallError::Later(_, wait)) = &result {
                let wait = (*wait).min(self.cfg.retry_max);
                let until =
                    chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                self.holds.hold(job.endpoint_id, &job.config, until);
            }
            let not_tried = not_tried(&result);
            let attempt = outcome(&self.cfg, job, result);
            let counted = match attempt.state {
                STATE_DELIVERED => Outcome::Delivered,
                STATE_FAILED => Outcome::Failed,
                _ => Outcome::Retry,
            };
            // A put-off (the plugin not there to try it, or the call not
            // made) is no attempt; the plugin's own metrics say it is
            // down (roboger_plugin_up) or busy (roboger_plugin_inflight).
            if !(not_tried && attempt.state == STATE_PENDING) {
                self.metrics.attempt(&job.plugin, counted, took);
            }
            if self.outcomes.send(attempt).await.is_err() {
                return;
            }
        }
    }
}

impl Dispatch {
    /// Takes out of `ready` the deliveries whose endpoint is on hold,
    /// grouped by endpoint (suspects apart), each group with when its
    /// hold ends.
    fn take_held(&self, ready: &mut Vec<Job>) -> Vec<(chrono::DateTime<chrono::Utc>, Vec<Job>)> {
        let now = chrono::Utc::now();
        let mut held: Vec<(chrono::DateTime<chrono::Utc>, Vec<Job>)> = Vec::new();
        let mut kept = Vec::with_capacity(ready.len());
        for job in ready.drain(..) {
            let Some(until) = self.holds.until(job.endpoint_id, &job.config, now) else {
                kept.push(job);
                continue;
            };
            match held
                .iter_mut()
                .find(|(_, g)| g[0].endpoint_id == job.endpoint_id && g[0].suspect == job.suspect)
            {
                Some((_, g)) => g.push(job),
                None => held.push((until, vec![job])),
            }
        }
        *ready = kept;
        held
    }

    /// Puts off `jobs` (deliveries to one endpoint on hold, all suspects
    /// or none) until `until`, their attempts unchanged, written straight
    /// to the database rather than through the writer's queue: the writer
    /// may itself be waiting for room in the dispatcher's, and a put-off
    /// takes no time to make, so it must not wait on the writer. When
    /// that write fails, the writer writes them as outcomes instead.
    async fn put_off(&self, until: chrono::DateTime<chrono::Utc>, jobs: Vec<Job>) {
        let Some(first) = jobs.first() else {
            return;
        };
        let endpoint_id = first.endpoint_id;
        let mut why = format!(
            "not tried: the target asked for a wait until {}",
            until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        if first.suspect {
            why = suspect::kept(why);
        }
        for j in &jobs {
            self.metrics.held(&j.plugin);
        }
        let ids = jobs.iter().map(|j| j.event.id.clone()).collect();
        let wrote = tokio::time::timeout(
            self.timeout,
            self.store
                .put_off(&self.node.instance, endpoint_id, ids, until, &why),
        )
        .await;
        let error = match wrote {
            Ok(Ok(_)) => {
                tracing::debug!(endpoint_id, deliveries = jobs.len(), %until, "put off: the endpoint is on hold");
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        tracing::warn!(
            endpoint_id,
            deliveries = jobs.len(),
            "cannot put off deliveries to an endpoint on hold ({error}); writing them as outcomes"
        );
        for job in jobs {
            let attempt = Attempt {
                event_id: job.event.id.clone(),
                endpoint_id,
                attempts: job.attempts,
                state: STATE_PENDING,
                error: Some(why.clone()),
                next_at: Some(until),
            };
            if self.outcomes.send(attempt).await.is_err() {
                return;
            }
        }
    }
}

impl Dispatch {
    /// Hands over the outcome of each of `jobs`, deliveries not made
    /// because their endpoint or address is disabled
    /// ([`disabled_outcome`]).
    async fn not_made(&self, jobs: Vec<Job>) {
        for job in &jobs {
            let Some(what) = job.disabled else {
                continue;
            };
            let attempt = disabled_outcome(&self.cfg, job, what);
            if attempt.state == STATE_FAILED {
                self.metrics.failed_untried(&job.plugin);
            }
            if self.outcomes.send(attempt).await.is_err() {
                return;
            }
        }
    }
}

/// A group of deliveries the dispatcher takes on at once.
enum Work {
    /// Handed to their plugin in one call.
    Call(Vec<Job>),
    /// Put off until their endpoint's hold ends.
    PutOff(chrono::DateTime<chrono::Utc>, Vec<Job>),
    /// Not made: their endpoint or address is disabled.
    Disabled(Vec<Job>),
}

async fn dispatch_loop(
    (store, plugins, timeout, node): (Store, Arc<Supervisor>, Duration, Arc<Node>),
    (cfg, metrics, liveness): (Arc<DeliveryConfig>, Arc<Metrics>, Arc<Liveness>),
    (mut rx, stopping): (mpsc::Receiver<Job>, CancellationToken),
    outcomes: mpsc::Sender<Attempt>,
) {
    let slots = Arc::new(Semaphore::new(cfg.concurrency));
    let all = u32::try_from(cfg.concurrency).unwrap_or(u32::MAX);
    let most = BATCH_MAX.min(cfg.concurrency).max(1);
    let d = Arc::new(Dispatch {
        store,
        plugins,
        timeout,
        cfg,
        metrics,
        outcomes,
        holds: Holds::default(),
        node,
    });
    let mut ready = Vec::with_capacity(most);
    loop {
        let job = tokio::select! {
            biased;
            _ = stopping.cancelled() => break,
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        ready.push(job);
        while ready.len() < most {
            match rx.try_recv() {
                Ok(j) => ready.push(j),
                Err(_) => break,
            }
        }
        let disabled: Vec<Job> = ready.extract_if(.., |j| j.disabled.is_some()).collect();
        let held = if d.holds.any(chrono::Utc::now()) {
            d.take_held(&mut ready)
        } else {
            Vec::new()
        };
        let calls = batches(&mut ready, |p| d.plugins.batch_limit(p));
        let work = (held.into_iter().map(|(until, g)| Work::PutOff(until, g)))
            .chain(calls.into_iter().map(Work::Call))
            .chain((!disabled.is_empty()).then_some(Work::Disabled(disabled)));
        for w in work {
            liveness.dispatcher.waiting();
            let (Work::Call(group) | Work::PutOff(_, group) | Work::Disabled(group)) = &w;
            let n = u32::try_from(group.len()).unwrap_or(u32::MAX);
            let permit = tokio::select! {
                biased;
                _ = stopping.cancelled() => break,
                p = slots.clone().acquire_many_owned(n) => p,
            };
            let Ok(permit) = permit else {
                return;
            };
            liveness.dispatcher.done();
            let d = d.clone();
            tokio::spawn(async move {
                match w {
                    Work::Call(group) => d.run(group).await,
                    Work::PutOff(until, group) => d.put_off(until, group).await,
                    Work::Disabled(group) => d.not_made(group).await,
                }
                drop(permit);
            });
        }
    }
    // Stopping: what was not started stays leased to this node, to be
    // handed over (`cluster::leave`); the writer learns at once that
    // nothing more is handed to the dispatcher. The calls in flight end,
    // each within the call timeout, and hand their outcomes to the
    // writer, whose queue closes once the last of them has.
    drop(rx);
    liveness.dispatcher.done();
    let _ = slots.acquire_many(all).await;
}

/// Groups the deliveries waiting at once into calls: the ones for a
/// plugin that offers `send_batch` (`limit` > 1 for it) into batches of
/// at most `limit`, without media or suspects; each other one on its
/// own. `limit` is asked once per plugin, however many of its deliveries
/// wait.
fn batches(ready: &mut Vec<Job>, mut limit: impl FnMut(&str) -> usize) -> Vec<Vec<Job>> {
    let mut calls: Vec<Vec<Job>> = Vec::new();
    // Per plugin seen: its limit and the call still open to it, if any.
    let mut plugins: Vec<(String, usize, Option<usize>)> = Vec::new();
    for job in ready.drain(..) {
        if job.suspect || job.event.media_size.is_some_and(|s| s > 0) {
            calls.push(vec![job]);
            continue;
        }
        let k = match plugins.iter().position(|(p, _, _)| *p == job.plugin) {
            Some(k) => k,
            None => {
                let l = limit(&job.plugin);
                plugins.push((job.plugin.clone(), l, None));
                plugins.len() - 1
            }
        };
        let (_, l, open) = &mut plugins[k];
        match *open {
            Some(i) if calls[i].len() < *l => calls[i].push(job),
            _ => {
                if *l > 1 {
                    *open = Some(calls.len());
                }
                calls.push(vec![job]);
            }
        }
    }
    calls
}

/// One delivery attempt, made alone for a suspect. An event with media
/// first waits for room in the plugin's byte budget
/// (`max-inflight-bytes`), then reads the media from the database; it is
/// held only while this call is made.
async fn attempt(
    store: &Store,
    plugins: &Supervisor,
    job: &Job,
    timeout: Duration,
) -> Result<Value, CallError> {
    let size = job
        .event
        .media_size
        .and_then(|s| usize::try_from(s).ok())
        .unwrap_or(0);
    plugins.register_secrets(&job.plugin, &job.config);
    let send = |params| async move {
        match job.suspect {
            true => plugins.send_alone(&job.plugin, params).await,
            false => plugins.call(&job.plugin, "send", params).await,
        }
    };
    if size == 0 {
        return send(send_params(job, None)?).await;
    }
    // The call carries the media base64-encoded: 4/3 of its size.
    let _room = plugins.reserve_bytes(&job.plugin, size / 3 * 4 + 4).await;
    let unavailable = |why: String| CallError::Unavailable(job.plugin.clone(), why);
    let media = match tokio::time::timeout(timeout, store.event_media(&job.event.id)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Err(unavailable(format!("cannot read the event's media: {e}"))),
        Err(_) => return Err(unavailable("reading the event's media timed out".into())),
    };
    // At most two copies at a time: the bytes go once encoded, the
    // encoding once written into the params.
    let media = media.map(|m| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(m)
    });
    let params = send_params(job, media.as_deref())?;
    drop(media);
    send(params).await
}

/// `send`'s params for `job` ([`SendArgs`], borrowed from the job),
/// written once as the JSON that goes down the pipe; `media` is the
/// event's media, base64-encoded.
fn send_params(job: &Job, media: Option<&str>) -> Result<RawParams, CallError> {
    let e = &job.event;
    let level = crate::level::Level::from_code(i64::from(e.level)).unwrap_or_default();
    let args = SendArgs {
        config: &job.config,
        event_id: &e.id,
        addr: &e.addr,
        addr_id: e.addr_id,
        msg: &e.msg,
        subject: &e.subject,
        formatted_subject: &e.formatted_subject,
        level: level.code(),
        level_name: level.name(),
        location: e.location.as_deref(),
        tag: e.tag.as_deref(),
        sender: e.sender.as_deref(),
        media_encoded: media,
        media_fname: e.media_fname.as_deref(),
        hops: u16::try_from(e.hops).ok().filter(|h| *h > 0),
    };
    serde_json::value::to_raw_value(&args)
        .map(RawParams)
        .map_err(|err| CallError::Failed(format!("cannot encode the event: {err}")))
}

/// The shortest put-off of a held delivery (one whose plugin is not
/// there to try it, or whose endpoint or address is disabled), unless
/// `retry-max` is shorter; see [`held_wait`].
const HELD_WAIT_MIN: Duration = Duration::from_secs(60);

/// How long `job`'s delivery, held (its plugin not there to try it, or
/// its endpoint or address disabled), is put off before it is looked at
/// again: a tenth of its event's age, in whole seconds, at least
/// [`HELD_WAIT_MIN`], at most `retry-max`. Each look is a claim and a
/// write, so a backlog held for hours (a plugin out overnight, whose
/// endpoints go on getting events) costs a tenth of what a look every
/// minute would, while a delivery that no make-due reached (the plugin
/// back on another node, or a make-due that failed) is made at most a
/// tenth of its lateness after it could have been.
fn held_wait(cfg: &DeliveryConfig, job: &Job, now: chrono::DateTime<chrono::Utc>) -> Duration {
    let age = (now - job.event.created).to_std().unwrap_or_default();
    Duration::from_secs((age / 10).as_secs())
        .max(HELD_WAIT_MIN)
        .min(cfg.retry_max)
}

/// Whether `result` says the plugin was not there to try the delivery:
/// not configured on this server, not running until it is restarted, or
/// for now (starting, restarting, no room for another call).
fn not_tried(result: &Result<Value, CallError>) -> bool {
    matches!(
        result,
        Err(CallError::NotConfigured(_) | CallError::NotRunning(..) | CallError::NotMade(..))
    )
}

/// The server's own wait after the `attempts`-th try: `retry-base`,
/// doubling with each try, at most `retry-max` (not spread).
fn backoff(cfg: &DeliveryConfig, attempts: i32) -> Duration {
    let exp = u32::try_from(attempts.max(1) - 1)
        .unwrap_or(u32::MAX)
        .min(20);
    cfg.retry_base
        .saturating_mul(2u32.saturating_pow(exp))
        .min(cfg.retry_max)
}

fn outcome(cfg: &DeliveryConfig, job: &Job, result: Result<Value, CallError>) -> Attempt {
    // No plugin here to try it: nothing was tried, so no attempt is spent.
    let not_tried = not_tried(&result);
    let for_now = matches!(result, Err(CallError::NotMade(..)));
    let attempts = if not_tried {
        job.attempts
    } else {
        job.attempts + 1
    };
    let base = Attempt {
        event_id: job.event.id.clone(),
        endpoint_id: job.endpoint_id,
        attempts,
        state: STATE_DELIVERED,
        error: None,
        next_at: None,
    };
    let mut asked = None;
    let (error, refused) = match result {
        Ok(_) => {
            tracing::debug!(event_id = %job.event.id, endpoint_id = job.endpoint_id, plugin = %job.plugin, attempts, "delivered");
            return base;
        }
        // The plugin refused the delivery itself (e.g. the egress policy
        // refuses its target, or the target found a loop of forwards):
        // trying again cannot help.
        Err(e @ CallError::Rejected(_)) => (e.to_string(), true),
        Err(CallError::Later(m, wait)) => {
            asked = Some(wait);
            (m, false)
        }
        Err(e) => suspect::said(&e, job.suspect),
    };
    let error = crate::secrets::scrub(&error).into_owned();
    let now = chrono::Utc::now();
    let ends = max_age_ends(cfg, job);
    let too_old = now >= ends;
    if not_tried && !too_old {
        // Spread, so the deliveries put off together do not all come back
        // at once.
        let (wait, error) = match for_now {
            // The plugin is back, or has room, in a moment: as soon as a
            // failed try of the same attempt would be tried again.
            true => {
                let wait = backoff(cfg, attempts);
                let error =
                    format!("not tried: {error}; tried again in {wait:?}, its attempts unspent");
                (wait, error)
            }
            // For a reload, a restart or a node that runs the plugin.
            false => {
                let wait = held_wait(cfg, job, now);
                let error = format!(
                    "not tried: {error}; looked at again in {wait:?} (and so on until \
                     delivery.max-age), for a reload, a restart or another node that runs \
                     the plugin"
                );
                (wait, error)
            }
        };
        tracing::debug!(event_id = %job.event.id, endpoint_id = job.endpoint_id, plugin = %job.plugin, ?wait, "put off: {error}");
        // Never past the end of its max-age, where it fails untried.
        let next = now + chrono::Duration::from_std(spread(wait)).unwrap_or_default();
        return Attempt {
            state: STATE_PENDING,
            error: Some(error),
            next_at: Some(next.min(ends)),
            ..base
        };
    }
    // Here an untried delivery is past its max-age.
    if not_tried || attempts >= cfg.max_attempts || too_old || refused {
        let error = match not_tried {
            true => format!("not tried: {error}, and delivery.max-age has passed"),
            false => error,
        };
        if log_budget::FAILED.logged() {
            tracing::warn!(event_id = %job.event.id, endpoint_id = job.endpoint_id, plugin = %job.plugin, attempts, "delivery failed for good: {error}");
        }
        return Attempt {
            state: STATE_FAILED,
            error: Some(error),
            ..base
        };
    }
    // The target's own wait, when it asked for one, and never past the
    // operator's bound on waits.
    let delay = backoff(cfg, attempts)
        .max(asked.unwrap_or_default())
        .min(cfg.retry_max);
    // The server's own backoff is spread, so the deliveries that failed
    // together (a target's outage, a plugin's crash) are not all tried
    // again at the same moment, and ends with the max-age, where the
    // last try is made; a wait the target asked for is kept as it is.
    let next = match asked {
        Some(_) => now + chrono::Duration::from_std(delay).unwrap_or_default(),
        None => (now + chrono::Duration::from_std(spread(delay)).unwrap_or_default()).min(ends),
    };
    if tracing::enabled!(tracing::Level::INFO) && log_budget::RETRIED.logged() {
        tracing::info!(event_id = %job.event.id, endpoint_id = job.endpoint_id, plugin = %job.plugin, attempts, next_at = %next, "delivery failed, will retry: {error}");
    }
    Attempt {
        state: STATE_PENDING,
        error: Some(error),
        next_at: Some(next),
        ..base
    }
}

/// The outcome of a due delivery whose endpoint or address is disabled:
/// not made, and put off with its attempts unspent for
/// [`held_wait`], but never past the moment
/// `max-age` ends it, where it fails. Enabling the endpoint or the
/// address makes it due at once (`api::manage`).
fn disabled_outcome(cfg: &DeliveryConfig, job: &Job, what: Disabled) -> Attempt {
    let what = match what {
        Disabled::Endpoint => format!("endpoint {} is disabled", job.endpoint_id),
        Disabled::Addr => format!("its address (addr {}) is disabled", job.event.addr_id),
    };
    let now = chrono::Utc::now();
    let ends = max_age_ends(cfg, job);
    let kept = |e: String| if job.suspect { suspect::kept(e) } else { e };
    let base = Attempt {
        event_id: job.event.id.clone(),
        endpoint_id: job.endpoint_id,
        attempts: job.attempts,
        state: STATE_PENDING,
        error: None,
        next_at: None,
    };
    if now >= ends {
        let error = kept(format!(
            "not tried: {what}, and delivery.max-age has passed"
        ));
        if log_budget::FAILED.logged() {
            tracing::warn!(event_id = %job.event.id, endpoint_id = job.endpoint_id, plugin = %job.plugin, "delivery failed for good: {error}");
        }
        return Attempt {
            state: STATE_FAILED,
            error: Some(error),
            ..base
        };
    }
    let wait = spread(held_wait(cfg, job, now));
    let error = kept(format!(
        "not tried: {what}; tried once it is enabled, until delivery.max-age"
    ));
    tracing::debug!(event_id = %job.event.id, endpoint_id = job.endpoint_id, plugin = %job.plugin, ?wait, "put off: {error}");
    Attempt {
        error: Some(error),
        next_at: Some((now + chrono::Duration::from_std(wait).unwrap_or_default()).min(ends)),
        ..base
    }
}

/// When `max-age` ends `job`'s delivery: neither a put-off nor the
/// server's own backoff after a failed try goes past it (only a wait the
/// target asked for may), and a delivery looked at then fails, untried,
/// or after that last try.
fn max_age_ends(cfg: &DeliveryConfig, job: &Job) -> chrono::DateTime<chrono::Utc> {
    chrono::Duration::from_std(cfg.max_age)
        .ok()
        .and_then(|age| job.event.created.checked_add_signed(age))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// `delay` shortened by up to a fifth at random (never lengthened, so
/// `retry-max` still bounds it).
fn spread(delay: Duration) -> Duration {
    use rand::RngExt;
    delay.mul_f64(rand::rng().random_range(0.8..=1.0))
}

async fn sweep_loop(
    store: Store,
    (cfg, timeout): (Arc<DeliveryConfig>, Duration),
    node: Arc<Node>,
    (jobs, stopping): (mpsc::Sender<Job>, CancellationToken),
) {
    let mut tick = tokio::time::interval(cfg.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outage = Outage::new(
        "cannot claim due deliveries",
        "due deliveries are claimed again",
    );
    // The deliveries of claims that failed but may have taken effect:
    // leased to this node, which renews them and never claims them again.
    let mut unsettled = Unsettled::new(
        "cannot free what failed claims leased",
        "what failed claims leased is freed again",
    );
    loop {
        tokio::select! {
            biased;
            _ = stopping.cancelled() => return,
            _ = tick.tick() => {}
        }
        unsettled.retry(&store, &node.instance, timeout).await;
        log_budget::say_ended();
        loop {
            let claimed = match store
                .claim_due(&node.instance, lease_until(&cfg), SWEEP_BATCH, timeout)
                .await
            {
                Ok(c) => {
                    outage.succeeded();
                    c
                }
                Err(e) => {
                    outage.failed(&e);
                    unsettled.free_later(e.in_doubt);
                    break;
                }
            };
            let n = claimed.len() as u64;
            for due in claimed {
                if jobs.send(job_of(due)).await.is_err() {
                    return;
                }
            }
            if n < SWEEP_BATCH {
                break;
            }
        }
    }
}

fn job_of(due: Due) -> Job {
    let (d, ep) = (due.delivery, due.endpoint);
    let disabled = match (ep.active == 1, due.addr_active) {
        (false, _) => Some(Disabled::Endpoint),
        (true, false) => Some(Disabled::Addr),
        (true, true) => None,
    };
    Job {
        event: due.event,
        endpoint_id: ep.id,
        plugin: ep.plugin_name,
        config: Arc::new(ep.config),
        attempts: d.attempts,
        suspect: suspect::is_suspect(d.last_error.as_deref()),
        disabled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, plugin: &str, media: bool) -> Job {
        let mut event = event::Model::sample(name);
        event.media = media.then(|| vec![0; 10]);
        Job {
            event: Arc::new(EventHead::of(event)),
            endpoint_id: 1,
            plugin: plugin.into(),
            config: Arc::new(Value::Null),
            attempts: 0,
            suspect: false,
            disabled: None,
        }
    }

    /// The defaults but `retry_base`.
    fn delivery_config(retry_base: Duration) -> DeliveryConfig {
        DeliveryConfig {
            node: "n".into(),
            max_attempts: 10,
            max_age: Duration::from_secs(86_400),
            retry_base,
            retry_max: Duration::from_secs(600),
            concurrency: 1,
            lease: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(1),
            heartbeat: Duration::from_secs(5),
            node_timeout: Duration::from_secs(30),
        }
    }

    /// Deliveries that failed together are tried again spread over a
    /// fifth of their backoff, never past it; a target's asked-for wait
    /// is kept as it is.
    #[test]
    fn the_servers_own_backoff_is_spread() {
        let cfg = delivery_config(Duration::from_secs(8));
        let j = job("e", "p", false);
        let wait = |result| {
            let before = chrono::Utc::now();
            let a = outcome(&cfg, &j, result);
            let next = a.next_at.expect("retried");
            (next - before).as_seconds_f64()
        };
        let waits: Vec<f64> = (0..50)
            .map(|_| wait(Err(CallError::Failed("down".into()))))
            .collect();
        assert!(waits.iter().all(|w| (6.3..=8.1).contains(w)), "{waits:?}");
        let lowest = waits.iter().cloned().fold(f64::MAX, f64::min);
        let highest = waits.iter().cloned().fold(0.0, f64::max);
        assert!(highest - lowest > 0.2, "not spread: {waits:?}");
        let asked = wait(Err(CallError::Later("429".into(), Duration::from_secs(30))));
        assert!((29.9..=30.1).contains(&asked), "{asked}");
        // Put off while the plugin is not running: spread likewise.
        let waits: Vec<f64> = (0..50)
            .map(|_| wait(Err(CallError::NotRunning("p".into(), "failed".into()))))
            .collect();
        assert!(waits.iter().all(|w| (47.9..=60.1).contains(w)), "{waits:?}");
        let lowest = waits.iter().cloned().fold(f64::MAX, f64::min);
        let highest = waits.iter().cloned().fold(0.0, f64::max);
        assert!(highest - lowest > 1.0, "not spread: {waits:?}");
    }

    /// A call not made (its plugin starting, restarting or with no room
    /// for it) spends no attempt and is tried again when a failed try of
    /// the same attempt would be; past `max-age` it fails for good.
    #[test]
    fn a_call_not_made_spends_no_attempt() {
        let cfg = delivery_config(Duration::from_secs(8));
        let busy = || {
            Err(CallError::NotMade(
                "p".into(),
                "too many calls in flight".into(),
            ))
        };
        let put_off = |j: &Job| {
            let before = chrono::Utc::now();
            let a = outcome(&cfg, j, busy());
            let wait = (a.next_at.expect("put off") - before).as_seconds_f64();
            (a.state, a.attempts, wait, a.error.unwrap_or_default())
        };
        let mut j = job("e", "p", false);
        let (state, attempts, wait, why) = put_off(&j);
        assert_eq!((state, attempts), (STATE_PENDING, 0));
        assert!((6.3..=8.1).contains(&wait), "{wait}");
        assert!(
            why.starts_with("not tried: plugin p is not available: too many calls in flight;"),
            "{why}"
        );
        // After two tries, the backoff after the second: 16 s, spread.
        j.attempts = 2;
        let (state, attempts, wait, _) = put_off(&j);
        assert_eq!((state, attempts), (STATE_PENDING, 2));
        assert!((12.7..=16.1).contains(&wait), "{wait}");
        let mut old = event::Model::sample("old");
        old.created = chrono::Utc::now() - chrono::Duration::days(2);
        j.event = Arc::new(EventHead::of(old));
        let a = outcome(&cfg, &j, busy());
        assert_eq!((a.state, a.attempts), (STATE_FAILED, 2));
        let why = a.error.unwrap_or_default();
        assert!(
            why.starts_with("not tried: plugin p is not available: too many calls in flight,")
                && why.ends_with("and delivery.max-age has passed"),
            "{why}"
        );
    }

    /// No wait of the server's own goes past the end of a delivery's
    /// `max-age`: a put-off (its plugin not running, or the call not
    /// made) or the backoff after a failed try ends there, so the
    /// delivery fails then, not up to a minute (or `retry-max`) later. A
    /// wait the target asked for is kept.
    #[test]
    fn no_wait_of_the_servers_own_goes_past_max_age() {
        let mut cfg = delivery_config(Duration::from_secs(30));
        cfg.max_age = Duration::from_secs(10);
        let j = job("e", "p", false);
        let ends = j.event.created + chrono::Duration::seconds(10);
        for result in [
            Err(CallError::NotRunning("p".into(), "failed".into())),
            Err(CallError::NotConfigured("p".into())),
            Err(CallError::NotMade("p".into(), "starting".into())),
            Err(CallError::Failed("down".into())),
        ] {
            let said = format!("{result:?}");
            let a = outcome(&cfg, &j, result);
            assert_eq!(a.state, STATE_PENDING, "{said}");
            assert_eq!(a.next_at, Some(ends), "{said}");
        }
        let a = outcome(
            &cfg,
            &j,
            Err(CallError::Later("503".into(), Duration::from_secs(30))),
        );
        let asked = (a.next_at.expect("retried") - chrono::Utc::now()).as_seconds_f64();
        assert!((29.0..=30.1).contains(&asked), "{asked}");
        // Looked at once it has ended: untried, it fails, saying so.
        let mut old = event::Model::sample("old");
        old.created = chrono::Utc::now() - chrono::Duration::seconds(11);
        let mut j = j;
        j.event = Arc::new(EventHead::of(old));
        let a = outcome(&cfg, &j, Err(CallError::NotConfigured("p".into())));
        assert_eq!((a.state, a.attempts), (STATE_FAILED, 0));
        let why = a.error.unwrap_or_default();
        assert!(why.starts_with("not tried: "), "{why}");
        assert!(why.ends_with(", and delivery.max-age has passed"), "{why}");
    }

    /// A delivery whose endpoint or address is disabled is not made: put
    /// off, its attempts unspent, for about a minute (at most
    /// `retry-max`) but never past the end of its `max-age`, where it
    /// fails; a suspect stays one.
    #[test]
    fn a_disabled_delivery_waits_until_its_max_age() {
        let mut cfg = delivery_config(Duration::from_secs(1));
        let mut j = job("e", "p", false);
        j.attempts = 3;
        let a = disabled_outcome(&cfg, &j, Disabled::Endpoint);
        let wait = (a.next_at.expect("put off") - chrono::Utc::now()).as_seconds_f64();
        assert_eq!((a.state, a.attempts), (STATE_PENDING, 3));
        assert!((47.0..=60.1).contains(&wait), "{wait}");
        let why = a.error.unwrap_or_default();
        assert!(
            why.starts_with("not tried: endpoint 1 is disabled;"),
            "{why}"
        );
        // Its max-age ends within the minute: looked at again then.
        cfg.max_age = Duration::from_secs(20);
        let a = disabled_outcome(&cfg, &j, Disabled::Addr);
        let wait = (a.next_at.expect("put off") - chrono::Utc::now()).as_seconds_f64();
        assert!((18.0..=20.1).contains(&wait), "{wait}");
        let why = a.error.unwrap_or_default();
        assert!(why.contains("its address (addr "), "{why}");
        // Then it fails, untried; a suspect says it still is one.
        let mut old = event::Model::sample("old");
        old.created = chrono::Utc::now() - chrono::Duration::seconds(21);
        j.event = Arc::new(EventHead::of(old));
        j.suspect = true;
        let a = disabled_outcome(&cfg, &j, Disabled::Endpoint);
        assert_eq!((a.state, a.attempts), (STATE_FAILED, 3));
        let why = a.error.unwrap_or_default();
        assert!(why.contains("delivery.max-age has passed"), "{why}");
        assert!(suspect::is_suspect(Some(&why)), "{why}");
    }

    /// A held delivery (its plugin not running, its endpoint or address
    /// disabled) is looked at again after a tenth of its event's age: a
    /// minute at first, then less and less often, at most `retry-max`
    /// apart, so a backlog held for hours is not claimed and written
    /// again every minute.
    #[test]
    fn a_backlog_held_for_long_is_looked_at_less_often() {
        let cfg = delivery_config(Duration::from_secs(1));
        let aged = |minutes: i64| {
            let mut e = event::Model::sample("e");
            e.created = chrono::Utc::now() - chrono::Duration::minutes(minutes);
            let mut j = job("e", "p", false);
            j.event = Arc::new(EventHead::of(e));
            j
        };
        let waits = |j: &Job| {
            let not_running = outcome(
                &cfg,
                j,
                Err(CallError::NotRunning("p".into(), "failed".into())),
            );
            let disabled = disabled_outcome(&cfg, j, Disabled::Endpoint);
            [not_running, disabled].map(|a| {
                assert_eq!((a.state, a.attempts), (STATE_PENDING, 0));
                (a.next_at.expect("put off") - chrono::Utc::now()).as_seconds_f64()
            })
        };
        for (minutes, (low, high)) in [
            (1, (47.9, 60.1)),
            (30, (143.9, 180.1)),
            (120, (479.9, 600.1)),
            (600, (479.9, 600.1)),
        ] {
            let j = aged(minutes);
            for wait in waits(&j) {
                assert!((low..=high).contains(&wait), "{minutes} min: {wait}");
            }
        }
        let why = outcome(&cfg, &aged(30), Err(CallError::NotConfigured("p".into())))
            .error
            .unwrap_or_default();
        assert!(
            why.contains("; looked at again in 180s (and so on"),
            "{why}"
        );
    }

    /// A delivery in flight when its plugin ended is retried as a
    /// suspect; a suspect whose send made alone ended it fails for good,
    /// however many attempts it has left.
    #[test]
    fn the_cause_of_a_plugins_end_fails_for_good() {
        let cfg = delivery_config(Duration::from_secs(1));
        let ended = |cause| {
            Err(CallError::Ended {
                plugin: "p".into(),
                why: "process exited (exit status: 3)".into(),
                cause,
            })
        };
        let mut j = job("e", "p", false);
        let a = outcome(&cfg, &j, ended(false));
        assert_eq!((a.state, a.attempts), (STATE_PENDING, 1));
        let why = a.error.expect("an error");
        assert!(suspect::is_suspect(Some(&why)), "{why}");
        j.attempts = 1;
        j.suspect = true;
        let a = outcome(&cfg, &j, ended(true));
        assert_eq!((a.state, a.attempts), (STATE_FAILED, 2));
        assert!(a.error.expect("an error").contains("exit status: 3"));
    }

    #[test]
    fn deliveries_waiting_together_go_in_batches_per_plugin() {
        let mut ready = vec![
            job("a1", "a", false),
            job("a2", "a", false),
            job("b1", "b", false),
            job("a3", "a", true),
            job("a4", "a", false),
            job("a5", "a", false),
            job("b2", "b", false),
            job("a6", "a", false),
        ];
        // A suspect goes alone too.
        ready[7].suspect = true;
        // `a` offers send_batch and takes 3 at a time; `b` does not.
        let mut asked = Vec::new();
        let calls = batches(&mut ready, |p| {
            asked.push(p.to_string());
            if p == "a" { 3 } else { 0 }
        });
        // Each plugin's limit is looked up once, not per delivery.
        assert_eq!(asked, ["a", "b"]);
        let names: Vec<Vec<&str>> = calls
            .iter()
            .map(|c| c.iter().map(|j| j.event.id.as_str()).collect())
            .collect();
        assert_eq!(
            names,
            [
                vec!["a1", "a2", "a4"],
                vec!["b1"],
                vec!["a3"],
                vec!["a5"],
                vec!["b2"],
                vec!["a6"]
            ]
        );
        assert!(ready.is_empty());
    }

    fn accept(id: &str, endpoints: &[i64]) -> (Accept, oneshot::Receiver<Stored>) {
        let (reply, rx) = oneshot::channel();
        let event = event::Model::sample(id);
        let targets = endpoints
            .iter()
            .map(|&endpoint_id| Target {
                endpoint_id,
                plugin: "webhook".into(),
                config: Arc::new(Value::Null),
            })
            .collect();
        let a = Accept {
            event,
            targets,
            reply,
            claim: Arc::new(Claim::default()),
        };
        (a, rx)
    }

    /// The writer's memory bound: with more than EARLY_MAX outcomes taken
    /// in early, the next commit takes no push; at the bound it takes them.
    #[test]
    fn pushes_wait_while_too_many_early_outcomes_do() {
        let (tx, mut accepts) = mpsc::channel(4);
        for id in ["a", "b", "c"] {
            assert!(tx.try_send(accept(id, &[1]).0).is_ok());
        }
        let outcome = |i: usize| Attempt {
            event_id: format!("e{i}"),
            endpoint_id: 1,
            attempts: 1,
            state: STATE_DELIVERED,
            error: None,
            next_at: None,
        };
        let mut inbox = Inbox {
            outcomes: mpsc::channel(1).1,
            early: (0..=EARLY_MAX).map(outcome).collect(),
            open: true,
        };
        let mut batch = Vec::new();
        take_pushes(&mut batch, &mut accepts, &inbox);
        assert!(batch.is_empty(), "a push was taken past the bound");
        assert_eq!(accepts.len(), 3, "the pushes wait in their queue");
        inbox.early.pop();
        take_pushes(&mut batch, &mut accepts, &inbox);
        let ids: Vec<&str> = batch.iter().map(|a| a.event.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn a_commit_is_answered_even_when_the_dispatcher_is_gone() {
        let (jobs, gone) = mpsc::channel(4);
        drop(gone);
        let (a, a_rx) = accept("a", &[1, 2]);
        let (b, b_rx) = accept("b", &[1]);
        let done = Committed {
            batch: vec![a, b],
            result: Ok(Written::default()),
        };
        assert!(answer(done, &jobs).is_err(), "no dispatcher to hand to");
        // Both events are stored: a 503 would be a lie. Their
        // deliveries stay pending in the database.
        for mut rx in [a_rx, b_rx] {
            assert!(matches!(rx.try_recv(), Ok(Stored::Yes)));
        }
    }

    /// Room in the dispatcher's queue is made by tasks that end, and a
    /// task ends once its outcome is queued: handing over more deliveries
    /// than the two queues hold, the writer takes the outcomes in
    /// meanwhile rather than wait for good.
    #[tokio::test]
    async fn handing_over_takes_in_outcomes_rather_than_wait_for_good() {
        let url = crate::config::translate_db_url("sqlite://").expect("a URL");
        let store = Store::connect(&url, 1, Duration::from_secs(5))
            .await
            .expect("a database");
        let (jobs, mut queued) = mpsc::channel::<Job>(1);
        let (outcome_tx, outcomes) = mpsc::channel::<Attempt>(1);
        // A dispatcher with room for one call at a time: it takes the next
        // delivery only once the last one's outcome is queued.
        let dispatcher = tokio::spawn(async move {
            while let Some(job) = queued.recv().await {
                let done = Attempt {
                    event_id: job.event.id.clone(),
                    endpoint_id: job.endpoint_id,
                    attempts: 1,
                    state: STATE_DELIVERED,
                    error: None,
                    next_at: None,
                };
                if outcome_tx.send(done).await.is_err() {
                    return;
                }
            }
        });
        let (a, _answer) = accept("a", &[1, 2, 3, 4, 5, 6, 7, 8]);
        let done = Committed {
            batch: vec![a],
            result: Ok(Written::default()),
        };
        let Ok(rest) = answer(done, &jobs) else {
            panic!("the dispatcher is there");
        };
        assert_eq!(rest.len(), 7, "one fitted in the queue");
        let mut inbox = Inbox {
            outcomes,
            early: Vec::new(),
            open: true,
        };
        let handed = tokio::time::timeout(
            Duration::from_secs(10),
            wait_for_room(rest, &jobs, &store, &mut inbox),
        )
        .await;
        assert!(matches!(handed, Ok(Ok(()))), "still waiting for room");
        drop(jobs);
        while let Some(o) = inbox.outcomes.recv().await {
            inbox.early.push(o);
        }
        let mut got: Vec<i64> = inbox.early.iter().map(|o| o.endpoint_id).collect();
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(dispatcher.await.is_ok());
    }

    #[test]
    fn a_commit_answers_every_push_and_gives_back_what_finds_the_queue_full() {
        let (jobs, mut queued) = mpsc::channel(1);
        let (a, mut a_rx) = accept("a", &[1, 2, 3]);
        let (mut b, mut b_rx) = accept("b", &[1]);
        b.event.addr_id = 7;
        let (c, mut c_rx) = accept("c", &[4]);
        let done = Committed {
            batch: vec![a, b, c],
            result: Ok(Written {
                gone_addrs: [7].into(),
                gone_endpoints: [2].into(),
                dropped_outcomes: 0,
            }),
        };
        let Ok(rest) = answer(done, &jobs) else {
            panic!("the dispatcher is there");
        };
        assert!(matches!(a_rx.try_recv(), Ok(Stored::Yes)));
        assert!(matches!(b_rx.try_recv(), Ok(Stored::AddrGone(addr)) if addr == "a"));
        assert!(matches!(c_rx.try_recv(), Ok(Stored::Yes)));
        // The queue took the first delivery; the rest come back in order,
        // without the deleted endpoint's nor the deleted address's.
        let first = queued
            .try_recv()
            .map(|j| (j.event.id.clone(), j.endpoint_id));
        assert_eq!(first.ok(), Some(("a".to_string(), 1)));
        let rest: Vec<(String, i64)> = rest
            .iter()
            .map(|j| (j.event.id.clone(), j.endpoint_id))
            .collect();
        assert_eq!(rest, [("a".to_string(), 3), ("c".to_string(), 4)]);
    }
}
