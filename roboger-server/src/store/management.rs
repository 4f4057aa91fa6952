//! The objects users manage: addresses, endpoints and subscriptions, with
//! the parent checks (an object reached through the wrong parent is "not
//! found") and the cascade on delete done here, once; and the snapshot the
//! routing index is built from.

use sea_orm::{
    ActiveModelTrait,
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
    sea_query::{Expr, Query},
};
use serde_json::Value;

use super::deletion::{Deleting, deletion_end, refuse_taken};
use super::entity::{self, addr, addr_limit, bucket, delivery, endpoint, event, subscription};
use super::{
    AddrRef, ENDPOINTS_PER_STATEMENT, Result, Store, StoreError, gone_since_read,
    is_unique_violation,
};
use crate::level::{Level, LevelMatch};

/// A change to an address string another address holds.
fn string_taken() -> StoreError {
    StoreError::Conflict("resource already exists: that address is taken".into())
}

/// A fresh random address string.
fn random_addr() -> String {
    crate::random::alphanumeric(entity::ADDR_LEN)
}

/// The addresses a deletion takes, with everything that hangs off them.
#[derive(Debug, Clone, Copy)]
enum Addrs {
    One(i64),
    /// Those with ids up to this one: what there was when a
    /// `delete-everything` was asked for.
    UpTo(i64),
}

impl Addrs {
    /// The condition on column `c`, which holds an address id.
    fn on(self, c: impl ColumnTrait) -> sea_orm::sea_query::Expr {
        match self {
            Addrs::One(id) => c.eq(id),
            Addrs::UpTo(id) => c.lte(id),
        }
    }
}

/// Changes to an address; `None` leaves a field as it is.
#[derive(Debug, Default, Clone)]
pub struct AddrPatch {
    pub active: Option<i16>,
    pub lim_c: Option<i64>,
    pub lim_s: Option<i64>,
}

/// Changes to an endpoint; `None` leaves a field as it is.
#[derive(Debug, Default, Clone)]
pub struct EndpointPatch {
    pub config: Option<Value>,
    pub active: Option<i16>,
    /// `Some(None)` clears the description.
    pub description: Option<Option<String>>,
}

/// Changes to a subscription; `None` leaves a field as it is, and for the
/// filters `Some(None)` means "any".
#[derive(Debug, Default, Clone)]
pub struct SubscriptionPatch {
    pub active: Option<i16>,
    pub location: Option<Option<String>>,
    pub tag: Option<Option<String>>,
    pub sender: Option<Option<String>>,
    pub level: Option<Level>,
    pub level_match: Option<LevelMatch>,
}

/// What the routing index is built from ([`Store::routing_snapshot`]).
#[derive(Debug, Default)]
pub struct RoutingSnapshot {
    pub addrs: Vec<addr::Model>,
    pub endpoints: Vec<endpoint::Model>,
    pub subs: Vec<subscription::Model>,
    /// Every deletion recorded and not yet ended: what they take is no
    /// longer routed to, though it is still there.
    pub deleting: Vec<Deleting>,
}

/// A subscription with the address id it belongs to (as the API shows it).
#[derive(Debug, Clone)]
pub struct SubscriptionRow {
    pub addr_id: i64,
    pub sub: subscription::Model,
}

impl Store {
    // ---- addresses -------------------------------------------------------

    /// One address.
    pub async fn addr_get(&self, r: &AddrRef) -> Result<addr::Model> {
        let q = match r {
            AddrRef::Id(id) => addr::Entity::find_by_id(*id),
            AddrRef::A(a) => addr::Entity::find().filter(addr::Column::A.eq(a.as_str())),
        };
        q.one(&self.db)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("addr {r}")))
    }

    /// The highest address id there is (0 when there is no address).
    pub async fn addr_highest_id(&self) -> Result<i64> {
        Ok(addr::Entity::find()
            .select_only()
            .column_as(addr::Column::Id.max(), "highest")
            .into_tuple::<Option<i64>>()
            .one(&self.db)
            .await?
            .flatten()
            .unwrap_or(0))
    }

    /// Creates an address with a fresh random 64-char string.
    pub async fn addr_create(&self) -> Result<addr::Model> {
        for _ in 0..3 {
            let am = addr::ActiveModel {
                a: Set(random_addr()),
                active: Set(1),
                lim_c: Set(100),
                lim_s: Set(10_000_000),
                ..Default::default()
            };
            let txn = self.begin_write().await?;
            match am.insert(&txn).await {
                Ok(m) => {
                    self.announce(&txn, Some(m.id)).await?;
                    txn.commit().await?;
                    return Ok(m);
                }
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict(
            "could not generate a unique address".into(),
        ))
    }

    /// Applies `patch` and returns the address as it now is.
    pub async fn addr_update(&self, r: &AddrRef, patch: AddrPatch) -> Result<addr::Model> {
        let current = self.addr_get(r).await?;
        if patch.active.is_none() && patch.lim_c.is_none() && patch.lim_s.is_none() {
            return Ok(current);
        }
        let mut am: addr::ActiveModel = current.into();
        if let Some(v) = patch.active {
            am.active = Set(v);
        }
        if let Some(v) = patch.lim_c {
            am.lim_c = Set(v);
        }
        if let Some(v) = patch.lim_s {
            am.lim_s = Set(v);
        }
        let txn = self.begin_write().await?;
        let a = am
            .update(&txn)
            .await
            .map_err(|e| gone_since_read(e, || format!("addr {r}")))?;
        self.announce_under(&txn, a.id, None).await?;
        txn.commit().await?;
        Ok(a)
    }

    /// Renames an address (to `to`, or a fresh random one) and returns it.
    /// A string taken by an address whose deletion goes on is given up by
    /// it ([`Store::addr_change_taking`]).
    pub async fn addr_change(&self, r: &AddrRef, to: Option<String>) -> Result<addr::Model> {
        let current = self.addr_get(r).await?;
        let mut am: addr::ActiveModel = current.into();
        am.a = Set(to.clone().unwrap_or_else(random_addr));
        let txn = self.begin_write().await?;
        match am.clone().update(&txn).await {
            Ok(a) => {
                self.announce_under(&txn, a.id, None).await?;
                txn.commit().await?;
                Ok(a)
            }
            Err(e) if is_unique_violation(&e) => {
                // PostgreSQL ends a transaction at its first error.
                txn.rollback().await?;
                match to {
                    Some(to) => self.addr_change_taking(r, am, &to).await,
                    None => Err(string_taken()),
                }
            }
            Err(e) => Err(gone_since_read(e, || format!("addr {r}"))),
        }
    }

    /// Gives address `r` (changed as `am`) the string `to`, which another
    /// address holds, if a recorded deletion takes that one: it gives the
    /// string up for a random one in the same transaction. `robogerctl
    /// deploy --delete-everything` gives the deploy's addresses the
    /// strings of those it deletes. A string held by any other address
    /// is taken (409).
    async fn addr_change_taking(
        &self,
        r: &AddrRef,
        am: addr::ActiveModel,
        to: &str,
    ) -> Result<addr::Model> {
        let holder = addr::Entity::find()
            .filter(addr::Column::A.eq(to))
            .one(&self.db)
            .await?
            .ok_or_else(string_taken)?;
        let deleted = self.deletion_covering(Deleting::Addr(holder.id)).await?;
        if deleted.is_none() {
            return Err(string_taken());
        }
        let txn = self.begin_write().await?;
        // Nothing to give up if its deletion has ended since.
        addr::Entity::update_many()
            .col_expr(addr::Column::A, Expr::value(random_addr()))
            .filter(addr::Column::Id.eq(holder.id))
            .exec(&txn)
            .await?;
        self.announce(&txn, Some(holder.id)).await?;
        let a = am.update(&txn).await.map_err(|e| {
            if is_unique_violation(&e) {
                string_taken()
            } else {
                gone_since_read(e, || format!("addr {r}"))
            }
        })?;
        self.announce_under(&txn, a.id, None).await?;
        txn.commit().await?;
        tracing::info!(
            addr = a.id,
            from = holder.id,
            "an address string is taken from an address being deleted"
        );
        Ok(a)
    }

    /// Deletes address `id` with its endpoints, subscriptions, bucket
    /// objects and counters, ending the recorded deletion `record`. Its
    /// events and their deliveries go first, a chunk at a time
    /// ([`Store::history_delete`]); the rest in one transaction, with the
    /// record, unless another node ended it first.
    pub(super) async fn addr_delete(&self, id: i64, record: i64) -> Result<()> {
        self.history_delete(Addrs::One(id).on(event::Column::AddrId))
            .await?;
        let txn = self.begin_write().await?;
        if !deletion_end(&txn, record).await? {
            return Ok(());
        }
        delete_addr_children(&txn, Addrs::One(id)).await?;
        addr::Entity::delete_by_id(id).exec(&txn).await?;
        self.announce(&txn, Some(id)).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Deletes every address with an id up to `up_to` (those there were
    /// when it was asked for) and everything that hangs off them, the
    /// events a chunk at a time first, as [`Store::addr_delete`] does.
    /// Addresses made since are kept.
    pub(super) async fn delete_everything(&self, up_to: i64, record: i64) -> Result<()> {
        let addrs = Addrs::UpTo(up_to);
        self.history_delete(addrs.on(event::Column::AddrId)).await?;
        let txn = self.begin_write().await?;
        if !deletion_end(&txn, record).await? {
            return Ok(());
        }
        delete_addr_children(&txn, addrs).await?;
        addr::Entity::delete_many()
            .filter(addrs.on(addr::Column::Id))
            .exec(&txn)
            .await?;
        self.announce(&txn, None).await?;
        txn.commit().await?;
        Ok(())
    }

    // ---- endpoints -------------------------------------------------------

    /// Up to `limit` endpoints of `addr_id` with ids above `after`, by id.
    pub async fn endpoint_page(
        &self,
        addr_id: i64,
        after: i64,
        limit: u64,
    ) -> Result<Vec<endpoint::Model>> {
        Ok(endpoint::Entity::find()
            .filter(endpoint::Column::AddrId.eq(addr_id))
            .filter(endpoint::Column::Id.gt(after))
            .order_by_asc(endpoint::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// One endpoint, only if it belongs to `addr_id`.
    pub async fn endpoint_get(&self, addr_id: i64, id: i64) -> Result<endpoint::Model> {
        endpoint::Entity::find_by_id(id)
            .filter(endpoint::Column::AddrId.eq(addr_id))
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("endpoint {id}")))
    }

    /// How many endpoints each plugin has (active or not), by name.
    pub async fn endpoints_by_plugin(&self) -> Result<Vec<(String, i64)>> {
        Ok(endpoint::Entity::find()
            .select_only()
            .column(endpoint::Column::PluginName)
            .column_as(endpoint::Column::Id.count(), "n")
            .group_by(endpoint::Column::PluginName)
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// Creates an endpoint (the caller has validated the config).
    pub async fn endpoint_create(
        &self,
        addr_id: i64,
        plugin_name: &str,
        config: Value,
        description: Option<String>,
        active: i16,
    ) -> Result<endpoint::Model> {
        let am = endpoint::ActiveModel {
            addr_id: Set(addr_id),
            plugin_name: Set(plugin_name.to_string()),
            config: Set(config),
            active: Set(active),
            description: Set(description),
            ..Default::default()
        };
        let txn = self.begin_write().await?;
        let ep = am
            .insert(&txn)
            .await
            .map_err(|e| gone_since_read(e, || format!("addr {addr_id}")))?;
        self.announce_under(&txn, addr_id, None).await?;
        txn.commit().await?;
        Ok(ep)
    }

    /// Applies `patch` to an endpoint that belongs to `addr_id`.
    pub async fn endpoint_update(
        &self,
        addr_id: i64,
        id: i64,
        patch: EndpointPatch,
    ) -> Result<endpoint::Model> {
        let current = self.endpoint_get(addr_id, id).await?;
        if patch.config.is_none() && patch.active.is_none() && patch.description.is_none() {
            return Ok(current);
        }
        let mut am: endpoint::ActiveModel = current.into();
        if let Some(v) = patch.config {
            am.config = Set(v);
        }
        if let Some(v) = patch.active {
            am.active = Set(v);
        }
        if let Some(v) = patch.description {
            am.description = Set(v);
        }
        let txn = self.begin_write().await?;
        let ep = am
            .update(&txn)
            .await
            .map_err(|e| gone_since_read(e, || format!("endpoint {id}")))?;
        self.announce_under(&txn, addr_id, Some(id)).await?;
        txn.commit().await?;
        Ok(ep)
    }

    /// Deletes endpoint `id` of address `addr_id`, with its subscriptions
    /// and deliveries (those a chunk at a time first), ending the recorded
    /// deletion `record` as [`Store::addr_delete`] does.
    pub(super) async fn endpoint_delete(&self, addr_id: i64, id: i64, record: i64) -> Result<()> {
        self.endpoint_history_delete(id).await?;
        let txn = self.begin_write().await?;
        if !deletion_end(&txn, record).await? {
            return Ok(());
        }
        delivery::Entity::delete_many()
            .filter(delivery::Column::EndpointId.eq(id))
            .exec(&txn)
            .await?;
        subscription::Entity::delete_many()
            .filter(subscription::Column::EndpointId.eq(id))
            .exec(&txn)
            .await?;
        endpoint::Entity::delete_many()
            .filter(endpoint::Column::Id.eq(id))
            .filter(endpoint::Column::AddrId.eq(addr_id))
            .exec(&txn)
            .await?;
        self.announce(&txn, Some(addr_id)).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Copies the subscriptions of `from` to `to` (both checked to belong to
    /// `addr_id`), first deleting `to`'s own when `replace` is set. The
    /// copies are active, as in the original.
    pub async fn copy_subscriptions(
        &self,
        addr_id: i64,
        from: i64,
        to: i64,
        replace: bool,
    ) -> Result<()> {
        let src = self.endpoint_get(addr_id, from).await?;
        let dst = self.endpoint_get(addr_id, to).await.map_err(|e| match e {
            StoreError::NotFound(_) => StoreError::NotFound(format!("target endpoint {to}")),
            e => e,
        })?;
        let subs = self.subscription_list_raw(src.id).await?;
        let txn = self.begin_write().await?;
        if replace {
            subscription::Entity::delete_many()
                .filter(subscription::Column::EndpointId.eq(dst.id))
                .exec(&txn)
                .await?;
        }
        for s in subs {
            subscription::ActiveModel {
                endpoint_id: Set(dst.id),
                active: Set(1),
                location: Set(s.location),
                tag: Set(s.tag),
                sender: Set(s.sender),
                level: Set(s.level),
                level_match: Set(s.level_match),
                ..Default::default()
            }
            .insert(&txn)
            .await
            .map_err(|e| gone_since_read(e, || format!("target endpoint {to}")))?;
        }
        self.announce_under(&txn, addr_id, Some(to)).await?;
        txn.commit().await?;
        Ok(())
    }

    // ---- subscriptions ---------------------------------------------------

    async fn subscription_list_raw(&self, endpoint_id: i64) -> Result<Vec<subscription::Model>> {
        Ok(subscription::Entity::find()
            .filter(subscription::Column::EndpointId.eq(endpoint_id))
            .order_by_asc(subscription::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// The subscriptions of an endpoint that belongs to `addr_id`.
    pub async fn subscription_list(
        &self,
        addr_id: i64,
        endpoint_id: i64,
    ) -> Result<Vec<SubscriptionRow>> {
        let ep = self.endpoint_get(addr_id, endpoint_id).await?;
        Ok(self
            .subscription_list_raw(ep.id)
            .await?
            .into_iter()
            .map(|sub| SubscriptionRow { addr_id, sub })
            .collect())
    }

    /// One subscription, only through its own endpoint and address.
    pub async fn subscription_get(
        &self,
        addr_id: i64,
        endpoint_id: i64,
        id: i64,
    ) -> Result<SubscriptionRow> {
        let not_found = || StoreError::NotFound(format!("subscription {id}"));
        self.endpoint_get(addr_id, endpoint_id)
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => not_found(),
                e => e,
            })?;
        let sub = subscription::Entity::find_by_id(id)
            .filter(subscription::Column::EndpointId.eq(endpoint_id))
            .one(&self.db)
            .await?
            .ok_or_else(not_found)?;
        Ok(SubscriptionRow { addr_id, sub })
    }

    /// Creates a subscription for an endpoint that belongs to `addr_id`.
    pub async fn subscription_create(
        &self,
        addr_id: i64,
        endpoint_id: i64,
        s: SubscriptionPatch,
    ) -> Result<SubscriptionRow> {
        let ep = self.endpoint_get(addr_id, endpoint_id).await?;
        let am = subscription::ActiveModel {
            endpoint_id: Set(ep.id),
            active: Set(s.active.unwrap_or(1)),
            location: Set(s.location.flatten()),
            tag: Set(s.tag.flatten()),
            sender: Set(s.sender.flatten()),
            level: Set(i16::from(s.level.unwrap_or_default().code())),
            level_match: Set(s.level_match.unwrap_or_default().as_str().to_string()),
            ..Default::default()
        };
        let txn = self.begin_write().await?;
        let sub = am
            .insert(&txn)
            .await
            .map_err(|e| gone_since_read(e, || format!("endpoint {endpoint_id}")))?;
        self.announce_under(&txn, addr_id, Some(endpoint_id))
            .await?;
        txn.commit().await?;
        Ok(SubscriptionRow { addr_id, sub })
    }

    /// Applies `patch` to a subscription reached through its own parents.
    pub async fn subscription_update(
        &self,
        addr_id: i64,
        endpoint_id: i64,
        id: i64,
        p: SubscriptionPatch,
    ) -> Result<SubscriptionRow> {
        let current = self.subscription_get(addr_id, endpoint_id, id).await?.sub;
        let mut am: subscription::ActiveModel = current.clone().into();
        let mut changed = false;
        if let Some(v) = p.active {
            am.active = Set(v);
            changed = true;
        }
        if let Some(v) = p.location {
            am.location = Set(v);
            changed = true;
        }
        if let Some(v) = p.tag {
            am.tag = Set(v);
            changed = true;
        }
        if let Some(v) = p.sender {
            am.sender = Set(v);
            changed = true;
        }
        if let Some(v) = p.level {
            am.level = Set(i16::from(v.code()));
            changed = true;
        }
        if let Some(v) = p.level_match {
            am.level_match = Set(v.as_str().to_string());
            changed = true;
        }
        let sub = if changed {
            let txn = self.begin_write().await?;
            let sub = am
                .update(&txn)
                .await
                .map_err(|e| gone_since_read(e, || format!("subscription {id}")))?;
            self.announce_under(&txn, addr_id, Some(endpoint_id))
                .await?;
            txn.commit().await?;
            sub
        } else {
            current
        };
        Ok(SubscriptionRow { addr_id, sub })
    }

    /// Deletes a subscription reached through its own parents.
    pub async fn subscription_delete(&self, addr_id: i64, endpoint_id: i64, id: i64) -> Result<()> {
        let row = self.subscription_get(addr_id, endpoint_id, id).await?;
        let txn = self.begin_write().await?;
        subscription::Entity::delete_by_id(row.sub.id)
            .exec(&txn)
            .await?;
        self.announce(&txn, Some(addr_id)).await?;
        txn.commit().await?;
        Ok(())
    }

    // ---- routing ---------------------------------------------------------

    /// Records in `txn` that the routes of `addr_id` (`None`: all) change.
    pub(super) async fn announce(
        &self,
        txn: &DatabaseTransaction,
        addr_id: Option<i64>,
    ) -> Result<i64> {
        super::cluster::announce_change(txn, self.backend, addr_id).await
    }

    /// Records in `txn` that the routes of address `a` change by a change
    /// under it (under its endpoint `ep`, if some), and refuses it (409)
    /// if a recorded deletion takes what it changes ([`refuse_taken`]).
    /// Called after the change's own writes: a transaction takes the rows
    /// it changes before the version row, as a deletion's end does.
    async fn announce_under(
        &self,
        txn: &DatabaseTransaction,
        a: i64,
        ep: Option<i64>,
    ) -> Result<()> {
        self.announce(txn, Some(a)).await?;
        refuse_taken(txn, a, ep).await
    }

    /// Addresses, endpoints and subscriptions (of the addresses `ids`, or
    /// of all), with the deletions under way, for the routing index: four
    /// queries either way.
    pub async fn routing_snapshot(&self, ids: Option<&[i64]>) -> Result<RoutingSnapshot> {
        let mut addrs = addr::Entity::find();
        let mut eps = endpoint::Entity::find();
        if let Some(ids) = ids {
            addrs = addrs.filter(addr::Column::Id.is_in(ids.iter().copied()));
            eps = eps.filter(endpoint::Column::AddrId.is_in(ids.iter().copied()));
        }
        let addrs = addrs.all(&self.db).await?;
        let eps = eps.order_by_asc(endpoint::Column::Id).all(&self.db).await?;
        let mut subs = subscription::Entity::find();
        if let Some(ids) = ids {
            // Their endpoints named by a subquery, not one parameter each:
            // an address may have more endpoints than a statement takes
            // parameters, and a statement whose text changed with their
            // number would be prepared and cached anew for each number.
            subs = subs.filter(
                subscription::Column::EndpointId.in_subquery(
                    Query::select()
                        .column(endpoint::Column::Id)
                        .from(endpoint::Entity)
                        .and_where(endpoint::Column::AddrId.is_in(ids.iter().copied()))
                        .to_owned(),
                ),
            );
        }
        let subs = subs.all(&self.db).await?;
        Ok(RoutingSnapshot {
            addrs,
            endpoints: eps,
            subs,
            deleting: self.deletions_recorded().await?,
        })
    }
}

/// Deletes what hangs off one address (or all of them) explicitly, so the
/// cascade holds even on a database whose foreign keys are off. The
/// deliveries go before the events: on PostgreSQL and MySQL no key ties a
/// delivery to its event (migration 9), so nothing else would delete them.
async fn delete_addr_children<C: ConnectionTrait>(c: &C, addrs: Addrs) -> Result<()> {
    let ep_ids: Vec<i64> = endpoint::Entity::find()
        .filter(addrs.on(endpoint::Column::AddrId))
        .select_only()
        .column(endpoint::Column::Id)
        .into_tuple()
        .all(c)
        .await?;
    // A chunk at a time: there may be more endpoints than a statement
    // takes parameters. (A subquery would make MariaDB scan every
    // delivery: it does not turn a `DELETE`'s subquery into a join.)
    for chunk in ep_ids.chunks(ENDPOINTS_PER_STATEMENT) {
        delivery::Entity::delete_many()
            .filter(delivery::Column::EndpointId.is_in(chunk.iter().copied()))
            .exec(c)
            .await?;
        subscription::Entity::delete_many()
            .filter(subscription::Column::EndpointId.is_in(chunk.iter().copied()))
            .exec(c)
            .await?;
    }
    event::Entity::delete_many()
        .filter(addrs.on(event::Column::AddrId))
        .exec(c)
        .await?;
    endpoint::Entity::delete_many()
        .filter(addrs.on(endpoint::Column::AddrId))
        .exec(c)
        .await?;
    // A bucket object of no address is the plugins' own, and kept.
    bucket::Entity::delete_many()
        .filter(addrs.on(bucket::Column::AddrId))
        .exec(c)
        .await?;
    addr_limit::Entity::delete_many()
        .filter(addrs.on(addr_limit::Column::AddrId))
        .exec(c)
        .await?;
    Ok(())
}
