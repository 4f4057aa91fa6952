//! Which endpoints receive an event: an in-memory index of every address
//! with its active endpoints and their active subscriptions, so a push
//! needs no query to find its routes.
//!
//! Every management change is recorded in the database's routing change
//! log with a version, in the change's own transaction (`store::cluster`).
//! Each node applies the log in order ([`Routes::catch_up`]): re-reading
//! only the addresses that changed, and rebuilding everything only for a
//! change to all addresses or when it finds a gap (changes pruned while it
//! was cut off). The node that made a change catches up, and answers once
//! the others have too; they are told by PostgreSQL's `NOTIFY` and also
//! poll the version ([`follow`]), so a missed notification costs a poll
//! interval at most, and a listener fallen silent is renewed
//! ([`listener`]). A node that polls does so more often for a moment
//! after each change, so a burst of changes is not answered a poll apart.
//!
//! A deletion's record is a routing change too (`store::deletion`): what
//! a deletion under way takes is routed to no more, an address marked
//! [`AddrRoutes::being_deleted`] and an endpoint left out.
//!
//! Invariant: a node that has applied version N obeys every change up to
//! N; the version only grows, and changes commit in version order.
//! An endpoint receives an event once, however many subscriptions match.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{self, Node};
use crate::config::DbBackend;
use crate::level::LevelMatch;
use crate::outage::Outage;
use crate::store::{Deleting, RoutingSnapshot, Store, StoreError};

mod listener;

use listener::Listener;

/// One subscription's filter.
#[derive(Debug, Clone)]
struct Rule {
    location: Option<String>,
    tag: Option<String>,
    sender: Option<String>,
    level: u8,
    level_match: LevelMatch,
}

/// An endpoint an event is delivered to.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint_id: i64,
    pub plugin: String,
    pub config: Arc<Value>,
}

#[derive(Debug)]
struct Endpoint {
    target: Target,
    rules: Vec<Rule>,
}

/// An address as routing sees it.
#[derive(Debug)]
pub struct AddrRoutes {
    pub id: i64,
    pub active: bool,
    /// A deletion of it was asked for and goes on: it is pushed to no
    /// more, as if already gone.
    pub being_deleted: bool,
    pub lim_c: i64,
    pub lim_s: i64,
    endpoints: Vec<Endpoint>,
}

/// What an event is matched on.
pub struct Matchable<'a> {
    pub level: u8,
    pub location: Option<&'a str>,
    pub tag: Option<&'a str>,
    pub sender: Option<&'a str>,
}

impl AddrRoutes {
    /// The endpoints whose active subscriptions match, each once.
    pub fn targets(&self, e: &Matchable<'_>) -> Vec<Target> {
        let field = |rule: &Option<String>, value: Option<&str>| {
            rule.as_deref().is_none_or(|r| Some(r) == value)
        };
        self.endpoints
            .iter()
            .filter(|ep| {
                ep.rules.iter().any(|r| {
                    field(&r.location, e.location)
                        && field(&r.tag, e.tag)
                        && field(&r.sender, e.sender)
                        && r.level_match.matches(r.level, e.level)
                })
            })
            .map(|ep| ep.target.clone())
            .collect()
    }
}

/// The index of every address.
#[derive(Debug, Default)]
pub struct Routes {
    by_a: RwLock<HashMap<String, Arc<AddrRoutes>>>,
    a_of: RwLock<HashMap<i64, String>>,
    /// The version of the newest change applied; held while applying, so
    /// changes are applied one catch-up at a time, in order.
    seen: tokio::sync::Mutex<i64>,
    /// `seen` as of its last catch-up, readable without waiting for one.
    applied: AtomicI64,
}

/// Changes read per query while catching up.
const CHANGES_PER_READ: u64 = 1000;
/// Past this many changed addresses in one catch-up, a full rebuild is
/// cheaper than re-reading them (and their ids stay well under every
/// backend's limit on bound parameters).
const REBUILD_AFTER: usize = 2000;

impl Routes {
    /// The routes of an address string, if it exists.
    pub fn get(&self, a: &str) -> Option<Arc<AddrRoutes>> {
        self.by_a.read().ok().and_then(|m| m.get(a).cloned())
    }

    /// How many addresses the index holds.
    pub fn len(&self) -> usize {
        self.by_a.read().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether the index holds no address.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The version of the newest routing change this index obeys.
    pub fn applied(&self) -> i64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Builds the whole index from the database (at start).
    pub async fn load(&self, store: &Store) -> Result<(), StoreError> {
        let mut seen = self.seen.lock().await;
        // The version first: a change committed during the rebuild is
        // applied again by the next catch-up, which is harmless.
        let version = store.routing_version().await?;
        self.reload(store).await?;
        *seen = version;
        self.applied.store(version, Ordering::Release);
        Ok(())
    }

    /// Applies every routing change newer than the last one applied;
    /// returns how many addresses were re-read (`usize::MAX`: all).
    pub async fn catch_up(&self, store: &Store) -> Result<usize, StoreError> {
        let mut seen = self.seen.lock().await;
        let mut changed = BTreeSet::new();
        let mut all = false;
        let mut newest = *seen;
        loop {
            let batch = store
                .routing_changes_since(newest, CHANGES_PER_READ)
                .await?;
            let Some(first) = batch.first() else { break };
            if first.version != newest + 1 {
                // Pruned before this node read them: rebuild.
                all = true;
            }
            for c in &batch {
                match c.addr_id {
                    Some(id) if !all => {
                        changed.insert(id);
                    }
                    _ => all = true,
                }
                newest = c.version;
            }
            if all || changed.len() > REBUILD_AFTER {
                all = true;
                newest = store.routing_version().await?.max(newest);
                break;
            }
            if (batch.len() as u64) < CHANGES_PER_READ {
                break;
            }
        }
        let n = if all {
            self.reload(store).await?;
            usize::MAX
        } else if changed.is_empty() {
            0
        } else {
            let ids: Vec<i64> = changed.into_iter().collect();
            self.refresh(store, &ids).await?;
            ids.len()
        };
        *seen = newest;
        self.applied.store(newest, Ordering::Release);
        Ok(n)
    }

    /// Rebuilds the whole index from the database.
    async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let built = build(store.routing_snapshot(None).await?);
        let a_of = built.iter().map(|(a, r)| (r.id, a.clone())).collect();
        if let (Ok(mut by_a), Ok(mut ids)) = (self.by_a.write(), self.a_of.write()) {
            *by_a = built;
            *ids = a_of;
        }
        Ok(())
    }

    /// Re-reads some addresses (after any change to them or below them),
    /// in one snapshot; an address that no longer exists is dropped.
    async fn refresh(&self, store: &Store, addr_ids: &[i64]) -> Result<(), StoreError> {
        let built = build(store.routing_snapshot(Some(addr_ids)).await?);
        if let (Ok(mut by_a), Ok(mut ids)) = (self.by_a.write(), self.a_of.write()) {
            for id in addr_ids {
                if let Some(old) = ids.remove(id) {
                    by_a.remove(&old);
                }
            }
            for (a, r) in built {
                ids.insert(r.id, a.clone());
                by_a.insert(a, r);
            }
        }
        Ok(())
    }
}

/// How often a node polls the change log's version: the way it learns of
/// changes on MySQL and SQLite, and on PostgreSQL while its listener
/// cannot be trusted; else, the safety net for a notification lost while
/// the listening connection was down.
const POLL: Duration = Duration::from_millis(50);
const POLL_WITH_NOTIFY: Duration = Duration::from_secs(1);
/// How often a node that polls does so for [`BURST`] after it applied a
/// change made through another node. Changes come in bursts (a
/// `robogerctl deploy`, a script), and each is answered only once every
/// node obeys it, so a burst of them would otherwise wait up to a
/// [`POLL`] each.
const POLL_IN_BURST: Duration = Duration::from_millis(5);
const BURST: Duration = Duration::from_secs(1);

/// Keeps `routes` in step with changes made through other nodes until
/// `routes` is dropped: on PostgreSQL it listens for their `NOTIFY` on a
/// connection of its own, probed ([`listener`]), and everywhere it polls
/// the version ([`POLL`], or [`POLL_IN_BURST`] for a [`BURST`] after it
/// applied a change), each catch-up bounded by `timeout`. After each,
/// `node`'s row says which change it obeys: the node that made one waits
/// for that before it answers ([`cluster::wait_obeyed`]).
pub async fn follow(routes: Weak<Routes>, store: Store, timeout: Duration, node: Arc<Node>) {
    let told = Arc::new(tokio::sync::Notify::new());
    let mut listener = if store.backend() == DbBackend::Postgres {
        Some(Listener::start(store.clone(), told.clone(), node.instance.clone(), timeout).await)
    } else {
        None
    };
    let mut outage = Outage::new(
        "cannot follow routing changes",
        "routing changes are followed again",
    );
    // Until when a burst of changes is taken to go on.
    let mut burst = tokio::time::Instant::now();
    loop {
        let every = if listener.as_ref().is_some_and(Listener::hears) {
            POLL_WITH_NOTIFY
        } else if tokio::time::Instant::now() < burst {
            POLL_IN_BURST
        } else {
            POLL
        };
        tokio::select! {
            _ = told.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
        let Some(r) = routes.upgrade() else { break };
        if let Some(l) = listener.as_mut() {
            l.check().await;
        }
        // Bounded: a catch-up waiting for good on a silent connection
        // would hold `seen`, and with it every management change's own.
        let caught_up = async {
            let n = r.catch_up(&store).await?;
            cluster::say_obeyed(&store, &node, r.applied()).await?;
            Ok::<_, StoreError>(n)
        };
        match crate::store::within(timeout, caught_up).await {
            Ok(n) => {
                outage.succeeded();
                if n > 0 {
                    tracing::debug!(addresses = n, "routing changes applied");
                    burst = tokio::time::Instant::now() + BURST;
                }
            }
            Err(e) => outage.failed(e),
        }
    }
}

fn build(snapshot: RoutingSnapshot) -> HashMap<String, Arc<AddrRoutes>> {
    let RoutingSnapshot {
        addrs,
        endpoints,
        subs,
        deleting,
    } = snapshot;
    let endpoint_deleted = |ep: i64| {
        deleting
            .iter()
            .any(|d| matches!(d, Deleting::Endpoint(_, e) if *e == ep))
    };
    let mut rules: HashMap<i64, Vec<Rule>> = HashMap::new();
    for s in subs.into_iter().filter(|s| s.active == 1) {
        let Some(level_match) = LevelMatch::parse(&s.level_match) else {
            tracing::warn!(subscription = s.id, level_match = %s.level_match, "subscription with an unknown level_match ignored");
            continue;
        };
        rules.entry(s.endpoint_id).or_default().push(Rule {
            location: s.location,
            tag: s.tag,
            sender: s.sender,
            level: u8::try_from(s.level).unwrap_or(u8::MAX),
            level_match,
        });
    }
    let mut eps: HashMap<i64, Vec<Endpoint>> = HashMap::new();
    for e in endpoints
        .into_iter()
        .filter(|e| e.active == 1 && !endpoint_deleted(e.id))
    {
        let Some(r) = rules.remove(&e.id) else {
            continue;
        };
        eps.entry(e.addr_id).or_default().push(Endpoint {
            target: Target {
                endpoint_id: e.id,
                plugin: e.plugin_name,
                config: Arc::new(e.config),
            },
            rules: r,
        });
    }
    addrs
        .into_iter()
        .map(|a| {
            let routes = AddrRoutes {
                id: a.id,
                active: a.active == 1,
                being_deleted: deleting.iter().any(|d| d.takes_addr(a.id)),
                lim_c: a.lim_c,
                lim_s: a.lim_s,
                endpoints: eps.remove(&a.id).unwrap_or_default(),
            };
            (a.a, Arc::new(routes))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::entity::{addr, endpoint, subscription};

    fn sub(id: i64, ep: i64, level: i16, m: &str, loc: Option<&str>) -> subscription::Model {
        subscription::Model {
            id,
            endpoint_id: ep,
            active: 1,
            location: loc.map(str::to_string),
            tag: None,
            sender: None,
            level,
            level_match: m.into(),
        }
    }

    #[test]
    fn one_target_per_endpoint_and_rules() {
        let addrs = vec![addr::Model {
            id: 1,
            a: "A".into(),
            active: 1,
            lim_c: 1,
            lim_s: 1,
        }];
        let ep = |id| endpoint::Model {
            id,
            addr_id: 1,
            plugin_name: "p".into(),
            config: Value::Null,
            active: 1,
            description: None,
        };
        let mut inactive = ep(3);
        inactive.active = 0;
        let subs = vec![
            sub(1, 1, 20, "ge", None),
            sub(2, 1, 30, "ge", Some("lab")),
            sub(3, 2, 40, "e", None),
            sub(4, 3, 10, "ge", None),
        ];
        let idx = build(RoutingSnapshot {
            addrs,
            endpoints: vec![ep(1), ep(2), inactive],
            subs,
            deleting: vec![],
        });
        let r = &idx["A"];
        let ids = |level, loc| -> Vec<i64> {
            r.targets(&Matchable {
                level,
                location: loc,
                tag: None,
                sender: None,
            })
            .iter()
            .map(|t| t.endpoint_id)
            .collect()
        };
        assert_eq!(
            ids(30, Some("lab")),
            [1],
            "two matching subscriptions, one delivery"
        );
        assert_eq!(ids(40, None), [1, 2]);
        assert_eq!(
            ids(10, None),
            Vec::<i64>::new(),
            "inactive endpoint 3 gets nothing"
        );
    }

    #[test]
    fn what_a_deletion_takes_is_routed_to_no_more() {
        let a = |id: i64| addr::Model {
            id,
            a: format!("A{id}"),
            active: 1,
            lim_c: 1,
            lim_s: 1,
        };
        let ep = |id: i64, addr_id: i64| endpoint::Model {
            id,
            addr_id,
            plugin_name: "p".into(),
            config: Value::Null,
            active: 1,
            description: None,
        };
        let snapshot = |deleting| RoutingSnapshot {
            addrs: vec![a(1), a(2), a(3)],
            endpoints: vec![ep(1, 1), ep(2, 1), ep(3, 3)],
            subs: vec![
                sub(1, 1, 10, "ge", None),
                sub(2, 2, 10, "ge", None),
                sub(3, 3, 10, "ge", None),
            ],
            deleting,
        };
        let targets = |r: &AddrRoutes| -> Vec<i64> {
            r.targets(&Matchable {
                level: 20,
                location: None,
                tag: None,
                sender: None,
            })
            .iter()
            .map(|t| t.endpoint_id)
            .collect()
        };
        let idx = build(snapshot(vec![Deleting::Endpoint(1, 2), Deleting::Addr(2)]));
        assert!(!idx["A1"].being_deleted);
        assert_eq!(targets(&idx["A1"]), [1], "endpoint 2 is being deleted");
        assert!(idx["A2"].being_deleted);
        assert!(!idx["A3"].being_deleted);
        let idx = build(snapshot(vec![Deleting::Everything(2)]));
        let deleted: Vec<bool> = ["A1", "A2", "A3"]
            .iter()
            .map(|k| idx[*k].being_deleted)
            .collect();
        assert_eq!(deleted, [true, true, false], "made after it was asked for");
        assert_eq!(targets(&idx["A3"]), [3]);
    }
}
