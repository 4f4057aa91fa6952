//! This server as one node of several sharing a database (see
//! `store::cluster` for the tables).
//!
//! Each process start is an *instance*: its configured `node` name plus a
//! random part, so two nodes given one name (or one node restarted) never
//! hold each other's leases. The instance writes a heartbeat every
//! `node-timeout / 3` (at most every second). Every node looks for
//! instances whose heartbeat is older than `node-timeout`: those are dead,
//! and the first node to see it frees their leases, so the deliveries they
//! held are claimed by the survivors at once instead of when the leases
//! run out. Leases of calls that outlast half a lease are renewed.
//! Periodic jobs that must run once for the whole cluster (cleanup,
//! maintenance) run on whichever node takes their lease. A node whose
//! database a newer build has migrated stops (see [`run`]): it must not
//! write to a schema it does not know.
//!
//! Invariant: a node only ever frees the leases of an instance whose
//! heartbeat has stopped (or its own, when it stops cleanly); outcomes are
//! written only under the writer's own lease (`store::delivery`), so a node
//! that comes back after being presumed dead cannot overwrite anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::DeliveryConfig;
use crate::metrics::Metrics;
use crate::outage::Outage;
use crate::store::entity::node;
use crate::store::{self, NodeRow, Store, StoreError};

/// Warns when the database lets the servers' user open fewer connections
/// than the nodes alive, this one among them, may open if each opens as
/// many as this one (`plugins_sql`: a plugin of this node's has `db:
/// true`). Past that a request waits for a connection the database
/// refuses ("too many connections", which the pool keeps trying), and
/// fails after `timeout` with the pool's "timed out", which cannot say
/// which of its causes it met (`store::StoreError`'s text lists them); a
/// node that cannot open the few connections its start needs cannot
/// apply the migrations, for the same reason. Called at start, before the
/// migrations (on a database with none yet, this node counts alone); each
/// statement is bounded by `within`, and a limit that cannot be read is
/// no warning.
pub async fn warn_connection_room(
    store: &Store,
    plugins_sql: bool,
    node_timeout: Duration,
    within: Duration,
) {
    let Some((need, what)) = store.connections_at_most(plugins_sql) else {
        return;
    };
    let (most, setting) = match store::within(within, store.connection_limit()).await {
        Ok(Some(limit)) => limit,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the database's connection limits");
            return;
        }
    };
    let others = store::within(within, store.nodes_alive(node_timeout))
        .await
        .unwrap_or(0);
    let nodes = others + 1;
    let total = need.saturating_mul(nodes);
    if u64::try_from(most).unwrap_or(0) < total {
        tracing::warn!(
            most,
            nodes,
            per_node = need,
            "the database lets this server's user open {most} connections at once ({setting}), \
             fewer than the {total} that {nodes} node(s) on it may open, {need} each ({what}): \
             requests past that wait for a connection the database refuses, and fail after \
             `timeout` (\"Connection pool timed out\"); raise {setting}, or lower db-pool-size"
        );
    }
}

/// How long a dead node stays in the list after it was rescued.
const KEEP_DEAD: Duration = Duration::from_secs(3600);
/// How long routing changes are kept: a node cut off for longer rebuilds
/// its whole index when it comes back.
const KEEP_CHANGES: Duration = Duration::from_secs(3600);
/// How often one node of the cluster prunes the tables above.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);
/// How often each node measures its clock against the database server's.
const CLOCK_EVERY: Duration = Duration::from_secs(10);

/// This process as a node of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    /// The configured name (`node`, default the host name).
    pub name: String,
    /// Unique to this process start: `name#random`; what leases name.
    pub instance: String,
    pub started: chrono::DateTime<chrono::Utc>,
    /// When this node's heartbeat was last written (at first, when the
    /// node was made), on the monotonic clock.
    beaten: Arc<std::sync::Mutex<tokio::time::Instant>>,
    /// The newest routing change this node obeys, as written in its row
    /// (or to be written at its first heartbeat).
    obeys: Arc<AtomicI64>,
}

impl Node {
    /// A new instance of the node called `name`.
    pub fn new(name: &str) -> Node {
        Node {
            name: name.to_string(),
            instance: format!("{name}#{}", crate::random::alphanumeric(12)),
            started: chrono::Utc::now(),
            beaten: Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())),
            obeys: Arc::new(AtomicI64::new(0)),
        }
    }

    /// How long since this node's heartbeat was last written. Past
    /// `node-timeout` the other nodes take it for dead, and `/ping` says
    /// it does not work: its database does not take its writes (a
    /// read-only replica after a failover, a full disk), though it may
    /// answer its reads.
    pub fn silent_for(&self) -> Duration {
        self.beaten.lock().map_or(Duration::MAX, |at| at.elapsed())
    }

    /// Has this node's row, once written, say it obeys the routing
    /// changes up to `version` (those applied before it [`join`]s).
    pub fn obeying(&self, version: i64) {
        self.obeys.store(version, Ordering::Release);
    }

    fn beat(&self) {
        if let Ok(mut at) = self.beaten.lock() {
            *at = tokio::time::Instant::now();
        }
    }

    fn row(&self) -> node::Model {
        node::Model {
            instance: self.instance.clone(),
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started: self.started,
            heartbeat: chrono::Utc::now(),
            rescued: None,
            routing_version: self.obeys.load(Ordering::Acquire),
        }
    }
}

fn ago(d: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::from_std(d).unwrap_or_default()
}

fn after(d: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default()
}

/// Registers the node (first heartbeat) so it is listed from the start,
/// within `timeout`. It is the start's first write: a database that
/// refuses it (a SQLite file this server's user may not write, a
/// read-only replica) would refuse every push, so the start fails with
/// its error.
pub async fn join(store: &Store, node: &Node, timeout: Duration) -> Result<(), StoreError> {
    match tokio::time::timeout(timeout, store.node_heartbeat(&node.row())).await {
        Ok(written) => {
            written?;
            node.beat();
            Ok(())
        }
        Err(_) => Err(StoreError::Connect(format!(
            "this node's row was not written within {}s (timeout)",
            timeout.as_secs_f64()
        ))),
    }
}

/// Every node of the cluster with the pending deliveries it holds, as
/// `me` sees them: its own row says it obeys the routing changes up to
/// `applied` (what its index obeys now), though the row is written only
/// at its follower's next turn.
pub async fn node_list(store: &Store, me: &Node, applied: i64) -> Result<Vec<NodeRow>, StoreError> {
    let mut rows = store.node_list().await?;
    for r in rows.iter_mut().filter(|r| r.node.instance == me.instance) {
        r.node.routing_version = r.node.routing_version.max(applied);
    }
    Ok(rows)
}

/// Writes in `node`'s row that it obeys the routing changes up to
/// `version`, unless it says so already.
pub async fn say_obeyed(store: &Store, node: &Node, version: i64) -> Result<(), StoreError> {
    if version > node.obeys.load(Ordering::Acquire) {
        store.node_obeys(&node.instance, version).await?;
        node.obeys.fetch_max(version, Ordering::AcqRel);
    }
    Ok(())
}

/// The first wait between two looks at whether the other nodes obey a
/// change, doubled after each look up to [`OBEYED_POLL_MOST`].
const OBEYED_POLL_FIRST: Duration = Duration::from_millis(1);
const OBEYED_POLL_MOST: Duration = Duration::from_millis(25);

/// Waits until every other live node obeys the routing change `version`
/// (a change this node has made and applied), for at most `limit`; gives
/// back the instances that still did not then. A node that made a change
/// answers it after this, so a client that then pushes through another
/// node finds the change obeyed there. Each look is bounded by what is
/// left of `limit`: one that this cuts short gives back what the look
/// before it found, and the first failing ends the wait, with a warning.
pub async fn wait_obeyed(
    store: &Store,
    node: &Node,
    version: i64,
    (node_timeout, limit): (Duration, Duration),
) -> Vec<String> {
    let end = tokio::time::Instant::now() + limit;
    let mut pause = OBEYED_POLL_FIRST;
    // What the last look found.
    let mut seen = None;
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let look = store::within(
            left.max(Duration::from_millis(1)),
            store.nodes_behind(&node.instance, version, node_timeout),
        );
        match look.await {
            Ok(behind) if behind.is_empty() || left.is_zero() => return behind,
            Ok(behind) => seen = Some(behind),
            Err(_) if seen.is_some() => return seen.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    version,
                    "cannot read whether the other nodes obey a routing change; answering it \
                     without: a push through another node may not obey it for a moment"
                );
                return Vec::new();
            }
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(OBEYED_POLL_MOST);
    }
}

/// Writes heartbeats, rescues dead nodes, renews long leases and runs the
/// cluster's maintenance until the task is aborted. Sends to `superseded`
/// the migrations the database records that this build does not have,
/// once there are some: a newer build migrated it while this node ran,
/// and the node is to stop.
pub async fn run(
    store: Store,
    node: Arc<Node>,
    cfg: Arc<DeliveryConfig>,
    metrics: Arc<Metrics>,
    superseded: watch::Sender<Option<Vec<String>>>,
) {
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renew_every = cfg.lease / 4;
    let mut renewed = tokio::time::Instant::now();
    let mut maintained = tokio::time::Instant::now();
    let mut clocked: Option<tokio::time::Instant> = None;
    let mut clock_off = false;
    let mut presumed_dead = false;
    // How long each of the database reads and writes below may take.
    let within = cfg.heartbeat.max(cfg.node_timeout / 2);
    let mut beating = Outage::new(
        "cannot write this node's heartbeat",
        "this node's heartbeats are written again",
    );
    let mut renewing = Outage::new("cannot renew leases", "leases are renewed again");
    let mut schema = Outage::new(
        "cannot read the database's migrations",
        "the database's migrations are read again",
    );
    let mut clock = Outage::new(
        "cannot read the database server's clock",
        "the database server's clock is read again",
    );
    let mut rescuing = Outage::new(
        "cannot look for dead nodes",
        "dead nodes are looked for again",
    );
    loop {
        tick.tick().await;
        let beat = store::within(within, store.node_heartbeat(&node.row())).await;
        let reached = beat.is_ok();
        if reached {
            node.beat();
        }
        match beat {
            Ok(true) => {
                beating.succeeded();
                presumed_dead = false;
            }
            Ok(false) => {
                beating.succeeded();
                if !presumed_dead {
                    tracing::warn!(
                        instance = %node.instance,
                        "this node missed its heartbeats for longer than node-timeout: \
                         the others freed its leases; its late outcomes are dropped"
                    );
                }
                presumed_dead = true;
            }
            Err(e) => beating.failed(e),
        }
        // While the database cannot take a heartbeat, these would only
        // wait out their timeouts and say so again.
        if reached && superseded.borrow().is_none() {
            match store::within(within, store.schema_newer()).await {
                Ok(unknown) if unknown.is_empty() => schema.succeeded(),
                Ok(unknown) => {
                    schema.succeeded();
                    tracing::error!(
                        migrations = ?unknown,
                        "the database was migrated by a newer roboger-server while this node \
                         ran: stopping, and leaving this node's deliveries to the newer build's \
                         nodes"
                    );
                    superseded.send_replace(Some(unknown));
                }
                Err(e) => schema.failed(e),
            }
        }
        // Read each tick while its failure is said, so that its end is.
        if reached && (clocked.is_none_or(|t| t.elapsed() >= CLOCK_EVERY) || clock.said()) {
            clocked = Some(tokio::time::Instant::now());
            let check = check_clock(
                &store,
                &metrics,
                cfg.node_timeout,
                (&mut clock_off, &mut clock),
            );
            if tokio::time::timeout(within, check).await.is_err() {
                clock.failed(format_args!("timed out after {within:?}"));
            }
        }
        rescue_dead(&store, &node, (cfg.node_timeout, within), &mut rescuing).await;
        if renewed.elapsed() >= renew_every {
            renewed = tokio::time::Instant::now();
            let renewal =
                store.renew_leases(&node.instance, after(cfg.lease / 2), after(cfg.lease));
            match store::within(within, renewal).await {
                Ok(n) => {
                    renewing.succeeded();
                    if n > 0 {
                        tracing::debug!(deliveries = n, "leases of long calls renewed");
                    }
                }
                Err(e) => renewing.failed(e),
            }
        }
        if maintained.elapsed() >= MAINTENANCE_EVERY {
            maintained = tokio::time::Instant::now();
            maintenance(&store, &node, within).await;
        }
    }
}

/// Measures this node's clock against the database server's, for
/// `roboger_clock_offset_seconds`, and warns once when the two differ by
/// more than a quarter of `node-timeout` (and says when they agree again):
/// nodes judge each other by the times they write, so a node whose clock
/// is off looks dead to the others, or takes them for dead.
async fn check_clock(
    store: &Store,
    metrics: &Metrics,
    node_timeout: Duration,
    (off, reading): (&mut bool, &mut Outage),
) {
    let offset = match store.clock_offset().await {
        Ok(o) => {
            reading.succeeded();
            match o {
                Some(o) => o,
                // SQLite, or a round trip too slow to tell.
                None => return,
            }
        }
        Err(e) => {
            reading.failed(e);
            return;
        }
    };
    let seconds = offset.num_milliseconds() as f64 / 1000.0;
    metrics.clock_offset(seconds);
    let over = seconds.abs() > node_timeout.as_secs_f64() / 4.0;
    if over && !*off {
        let way = if seconds < 0.0 { "ahead of" } else { "behind" };
        tracing::warn!(
            offset_seconds = seconds,
            "this node's clock is {:.3} s {way} the database server's: nodes judge each \
             other by the times they write (heartbeats, leases), so keep every clock in step \
             (NTP); off by node-timeout ({node_timeout:?}), a node looks dead to the others \
             or takes them for dead",
            seconds.abs()
        );
    } else if !over && *off {
        tracing::info!(
            offset_seconds = seconds,
            "this node's clock is in step with the database server's again"
        );
    }
    *off = over;
}

/// Frees the leases of the instances whose heartbeat is older than
/// `timeout`; each read and write bounded by `within`.
async fn rescue_dead(
    store: &Store,
    node: &Node,
    (timeout, within): (Duration, Duration),
    outage: &mut Outage,
) {
    let dead = match store::within(within, store.nodes_dead(&node.instance, ago(timeout))).await {
        Ok(d) => {
            outage.succeeded();
            d
        }
        Err(e) => {
            outage.failed(e);
            return;
        }
    };
    for instance in dead {
        match store::within(within, store.node_rescue(&instance, ago(timeout))).await {
            Ok(Some(n)) => tracing::warn!(
                dead = %instance,
                deliveries = n,
                "node missed its heartbeats for {timeout:?}: its deliveries are freed for the others"
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, dead = %instance, "cannot free a dead node's leases")
            }
        }
    }
}

async fn maintenance(store: &Store, node: &Node, within: Duration) {
    if !once(store, node, ("maintenance", MAINTENANCE_EVERY), within).await {
        return;
    }
    if let Err(e) = store::within(within, store.nodes_forget(ago(KEEP_DEAD))).await {
        tracing::warn!(error = %e, "cannot forget dead nodes");
    }
    if let Err(e) = store::within(within, store.routing_changes_prune(ago(KEEP_CHANGES))).await {
        tracing::warn!(error = %e, "cannot prune routing changes");
    }
}

/// Whether this node is the one to run job `name` now, for the period
/// `every`: true for one node of the cluster per period. The lease ends a
/// little before the period, so the holder's next tick finds it free.
/// False too when the database does not answer `within`.
pub async fn once(
    store: &Store,
    node: &Node,
    (name, every): (&str, Duration),
    within: Duration,
) -> bool {
    let take = store.job_take(name, &node.instance, after(every.mul_f64(0.9)));
    match store::within(within, take).await {
        Ok(mine) => mine,
        Err(e) => {
            tracing::warn!(error = %e, job = name, "cannot take a job's lease; skipping it");
            false
        }
    }
}

/// A node stopping cleanly: its pending deliveries go to the others now
/// (if the database answers `within`; else when its heartbeat is seen
/// to stop).
pub async fn leave(store: &Store, node: &Node, within: Duration) {
    match store::within(within, store.node_leave(&node.instance)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(deliveries = n, "pending deliveries left to the other nodes"),
        Err(e) => tracing::warn!(error = %e, "cannot leave the cluster cleanly"),
    }
}
