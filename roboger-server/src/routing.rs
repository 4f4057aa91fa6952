//! Which endpoints receive an event: an in-memory index of every address
//! with its active endpoints and their active subscriptions, so a push
//! needs no query to find its routes.
//!
//! Invariant: the management API refreshes an address's entry after every
//! change to it, its endpoints or its subscriptions; `Routes::reload`
//! rebuilds everything (at start and after `delete-everything`).
//! An endpoint receives an event once, however many subscriptions match.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::Value;

use crate::level::LevelMatch;
use crate::store::entity::{addr, endpoint, subscription};
use crate::store::{AddrRef, Store, StoreError};

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
}

impl Routes {
    /// The routes of an address string, if it exists.
    pub fn get(&self, a: &str) -> Option<Arc<AddrRoutes>> {
        self.by_a.read().ok().and_then(|m| m.get(a).cloned())
    }

    /// Rebuilds the whole index from the database.
    pub async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let (addrs, endpoints, subs) = store.routing_snapshot(None).await?;
        let built = build(addrs, endpoints, subs);
        let a_of = built.iter().map(|(a, r)| (r.id, a.clone())).collect();
        if let (Ok(mut by_a), Ok(mut ids)) = (self.by_a.write(), self.a_of.write()) {
            *by_a = built;
            *ids = a_of;
        }
        Ok(())
    }

    /// Re-reads one address (after any change to it or below it); an
    /// address that no longer exists is dropped.
    pub async fn refresh(&self, store: &Store, addr_id: i64) -> Result<(), StoreError> {
        let (addrs, endpoints, subs) = store.routing_snapshot(Some(addr_id)).await?;
        let built = build(addrs, endpoints, subs);
        if let (Ok(mut by_a), Ok(mut ids)) = (self.by_a.write(), self.a_of.write()) {
            if let Some(old) = ids.remove(&addr_id) {
                by_a.remove(&old);
            }
            for (a, r) in built {
                ids.insert(r.id, a.clone());
                by_a.insert(a, r);
            }
        }
        Ok(())
    }

    /// Re-reads the address a path names (by id or string).
    pub async fn refresh_ref(&self, store: &Store, r: &AddrRef) -> Result<(), StoreError> {
        let id = match r {
            AddrRef::Id(id) => Some(*id),
            AddrRef::A(a) => self.get(a).map(|x| x.id),
        };
        match id {
            Some(id) => self.refresh(store, id).await,
            None => self.reload(store).await,
        }
    }
}

fn build(
    addrs: Vec<addr::Model>,
    endpoints: Vec<endpoint::Model>,
    subs: Vec<subscription::Model>,
) -> HashMap<String, Arc<AddrRoutes>> {
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
    for e in endpoints.into_iter().filter(|e| e.active == 1) {
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
        let idx = build(addrs, vec![ep(1), ep(2), inactive], subs);
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
}
