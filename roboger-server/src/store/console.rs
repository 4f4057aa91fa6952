//! What the web console keeps in the database: its sessions, and the
//! paged and searched reads its pages make (the management API sends
//! whole collections instead, read a page at a time by `api::reply`).
//!
//! Invariant: a session is found only by the digest of its cookie (and of
//! the master key, `api::console::session`) and only before it expires;
//! the cookie itself is never stored.

use sea_orm::sea_query::{Expr, ExprTrait, LikeExpr};
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    Select,
};

use super::delivery::event_heads;
use super::entity::{
    ADDR_LEN, addr, console_session, console_signin, delivery, endpoint, event, subscription,
};
use super::wrong_keys::WRONG_KEYS_KEPT;
use super::{EventHead, Result, Store, StoreError};

type Time = chrono::DateTime<chrono::Utc>;

/// One page of addresses.
#[derive(Debug)]
pub struct AddrPage {
    pub rows: Vec<addr::Model>,
    /// Whether there are more after the last row.
    pub more: bool,
}

/// One page of an address's endpoints, each with a page of its
/// subscriptions.
#[derive(Debug)]
pub struct EndpointPage {
    pub rows: Vec<(endpoint::Model, SubscriptionPage)>,
    /// Whether the address has more endpoints after the last row.
    pub more: bool,
}

/// One page of an endpoint's subscriptions.
#[derive(Debug)]
pub struct SubscriptionPage {
    pub subs: Vec<subscription::Model>,
    /// How many subscriptions the endpoint has.
    pub count: u64,
    /// How many of them come before `subs`.
    pub before: u64,
    /// The first subscription of the next page, when there is one.
    pub next: Option<i64>,
}

/// Which of its subscriptions each endpoint on a page shows: `limit` of
/// them, the page holding `holding`'s subscription for its endpoint
/// (endpoint, subscription) and the first page for the others.
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionsShown {
    pub limit: u64,
    pub holding: Option<(i64, i64)>,
}

impl Store {
    // ---- sessions ------------------------------------------------------------

    /// Stores a new session.
    pub async fn session_create(&self, s: console_session::Model) -> Result<()> {
        console_session::Entity::insert(console_session::ActiveModel::from(s))
            .exec_without_returning(&self.db)
            .await?;
        Ok(())
    }

    /// The session whose cookie has digest `id`, unless it has expired.
    pub async fn session_get(&self, id: &str, now: Time) -> Result<Option<console_session::Model>> {
        Ok(console_session::Entity::find_by_id(id.to_string())
            .filter(console_session::Column::Expires.gt(now))
            .one(&self.db)
            .await?)
    }

    /// Ends a session (signing out).
    pub async fn session_delete(&self, id: &str) -> Result<()> {
        console_session::Entity::delete_by_id(id.to_string())
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Forgets expired sessions, and wrong master keys whose last one is
    /// older than [`WRONG_KEYS_KEPT`] (part of the core cleanup).
    pub async fn sessions_cleanup(&self, now: Time) -> Result<u64> {
        let before = now - chrono::Duration::from_std(WRONG_KEYS_KEPT).unwrap_or_default();
        let s = console_session::Entity::delete_many()
            .filter(console_session::Column::Expires.lte(now))
            .exec(&self.db)
            .await?;
        console_signin::Entity::delete_many()
            .filter(console_signin::Column::LastFailure.lt(before))
            .exec(&self.db)
            .await?;
        Ok(s.rows_affected)
    }

    // ---- pages -----------------------------------------------------------------

    /// Up to `limit` addresses by id after `after`, those whose string
    /// holds `search` (or whose id it is) when given. Without a search it
    /// reads by the primary key, so a page costs the same with any number
    /// of addresses; a search for part of an address reads on by id until
    /// it has a page (or the end), and one as long as an address is found
    /// through its unique index.
    pub async fn addr_page(
        &self,
        search: Option<&str>,
        after: Option<i64>,
        limit: u64,
    ) -> Result<AddrPage> {
        let Some(q) = addr_page_select(search, after) else {
            return Ok(AddrPage {
                rows: Vec::new(),
                more: false,
            });
        };
        let mut rows = q.limit(limit + 1).all(&self.db).await?;
        let more = rows.len() as u64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(AddrPage { rows, more })
    }

    /// How many addresses there are.
    pub async fn addr_count(&self) -> Result<u64> {
        Ok(addr::Entity::find().count(&self.db).await?)
    }

    /// Up to `limit` endpoints of `addr_id` by id after `after`, with
    /// their subscriptions read in one query: a page costs the same
    /// however many endpoints the address has.
    pub async fn endpoint_block_page(
        &self,
        addr_id: i64,
        after: i64,
        limit: u64,
        subs: SubscriptionsShown,
    ) -> Result<EndpointPage> {
        let mut eps = self.endpoint_page(addr_id, after, limit + 1).await?;
        let more = eps.len() as u64 > limit;
        eps.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let counts: Vec<(i64, i64)> = subscription::Entity::find()
            .select_only()
            .column(subscription::Column::EndpointId)
            .column_as(subscription::Column::Id.count(), "n")
            .filter(subscription::Column::EndpointId.is_in(eps.iter().map(|e| e.id)))
            .group_by(subscription::Column::EndpointId)
            .into_tuple()
            .all(&self.db)
            .await?;
        let mut rows = Vec::with_capacity(eps.len());
        for ep in eps {
            let count = counts
                .iter()
                .find(|(id, _)| *id == ep.id)
                .map_or(0, |(_, n)| u64::try_from(*n).unwrap_or(0));
            let holding = subs.holding.filter(|(of, _)| *of == ep.id).map(|(_, s)| s);
            let page = self
                .subscription_page(ep.id, count, holding, subs.limit)
                .await?;
            rows.push((ep, page));
        }
        Ok(EndpointPage { rows, more })
    }

    /// The page of `limit` subscriptions of endpoint `ep` (which has
    /// `count`) that holds subscription `holding`, else the first.
    async fn subscription_page(
        &self,
        ep: i64,
        count: u64,
        holding: Option<i64>,
        limit: u64,
    ) -> Result<SubscriptionPage> {
        let of_ep = || subscription::Entity::find().filter(subscription::Column::EndpointId.eq(ep));
        let limit = Ord::max(limit, 1);
        let (before, after) = match holding {
            Some(sub) => {
                self.page_holding(of_ep, subscription::Column::Id, sub, limit)
                    .await?
            }
            None => (0, 0),
        };
        let mut subs = of_ep()
            .filter(subscription::Column::Id.gt(after))
            .order_by_asc(subscription::Column::Id)
            .limit(limit + 1)
            .all(&self.db)
            .await?;
        let next = (subs.len() as u64 > limit)
            .then(|| subs.pop().map(|s| s.id))
            .flatten();
        Ok(SubscriptionPage {
            subs,
            count,
            before,
            next,
        })
    }

    /// How many endpoints an address has.
    pub async fn endpoint_count(&self, addr_id: i64) -> Result<u64> {
        Ok(endpoint::Entity::find()
            .filter(endpoint::Column::AddrId.eq(addr_id))
            .count(&self.db)
            .await?)
    }

    /// The `after` of the page of `limit` endpoints of `addr_id` that holds
    /// endpoint `ep` (0 for the first page), so that a page shown after a
    /// change to an endpoint shows it.
    pub async fn endpoint_page_holding(&self, addr_id: i64, ep: i64, limit: u64) -> Result<i64> {
        let of_addr = || endpoint::Entity::find().filter(endpoint::Column::AddrId.eq(addr_id));
        let (_, after) = self
            .page_holding(of_addr, endpoint::Column::Id, ep, limit)
            .await?;
        Ok(after)
    }

    /// Where the page of `limit` of `rows` (in the order of their `id`)
    /// that holds the row `target` starts: how many rows come before it,
    /// and the id of the last of them (0 for the first page).
    async fn page_holding<E, C>(
        &self,
        rows: impl Fn() -> Select<E>,
        id: C,
        target: i64,
        limit: u64,
    ) -> Result<(u64, i64)>
    where
        E: EntityTrait,
        E::Model: Sync,
        C: ColumnTrait,
    {
        let ahead = rows().filter(id.lt(target)).count(&self.db).await?;
        let limit = Ord::max(limit, 1);
        let before = ahead / limit * limit;
        if before == 0 {
            return Ok((0, 0));
        }
        let last: Option<i64> = rows()
            .select_only()
            .column(id)
            .order_by_asc(id)
            .offset(before - 1)
            .limit(1)
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok((before, last.unwrap_or(0)))
    }

    /// The plugin names of those of `ids` that are endpoints of `addr_id`.
    pub async fn endpoint_names(&self, addr_id: i64, ids: &[i64]) -> Result<Vec<(i64, String)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(endpoint::Entity::find()
            .select_only()
            .column(endpoint::Column::Id)
            .column(endpoint::Column::PluginName)
            .filter(endpoint::Column::AddrId.eq(addr_id))
            .filter(endpoint::Column::Id.is_in(ids.iter().copied()))
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// Up to `limit` events of an address, newest first, older than event
    /// `before` when given.
    pub async fn event_page(
        &self,
        addr_id: i64,
        before: Option<&str>,
        limit: u64,
    ) -> Result<Vec<EventHead>> {
        let mut q = event_heads(self.backend).filter(event::Column::AddrId.eq(addr_id));
        if let Some(before) = before {
            let created: Option<Time> = event::Entity::find_by_id(before.to_string())
                .select_only()
                .column(event::Column::Created)
                .filter(event::Column::AddrId.eq(addr_id))
                .into_tuple()
                .one(&self.db)
                .await?;
            let created = created.ok_or_else(|| StoreError::NotFound(format!("event {before}")))?;
            q = q.filter(
                Condition::any()
                    .add(event::Column::Created.lt(created))
                    .add(
                        Condition::all()
                            .add(event::Column::Created.eq(created))
                            .add(event::Column::Id.lt(before)),
                    ),
            );
        }
        Ok(q.order_by_desc(event::Column::Created)
            .order_by_desc(event::Column::Id)
            .limit(limit)
            .into_model::<EventHead>()
            .all(&self.db)
            .await?)
    }

    /// The deliveries of these events, by event and endpoint.
    pub async fn deliveries_of(&self, events: &[String]) -> Result<Vec<delivery::Model>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        Ok(delivery::Entity::find()
            .filter(delivery::Column::EventId.is_in(events.iter().cloned()))
            .order_by_asc(delivery::Column::EventId)
            .order_by_asc(delivery::Column::EndpointId)
            .all(&self.db)
            .await?)
    }
}

/// [`Store::addr_page`]'s query, without its limit; `None` when nothing
/// can match. Every address is [`ADDR_LEN`] characters long, so a search
/// of that length holds only the address equal to it, and a longer one
/// none: those need no scan of the table.
fn addr_page_select(search: Option<&str>, after: Option<i64>) -> Option<Select<addr::Entity>> {
    let mut q = addr::Entity::find().order_by_asc(addr::Column::Id);
    if let Some(after) = after {
        q = q.filter(addr::Column::Id.gt(after));
    }
    let Some(s) = search.filter(|s| !s.is_empty()) else {
        return Some(q);
    };
    let len = s.chars().count();
    if len > ADDR_LEN {
        return None;
    }
    if len == ADDR_LEN {
        return Some(q.filter(addr::Column::A.eq(s)));
    }
    let escaped: String = s
        .chars()
        .flat_map(|c| match c {
            '!' | '%' | '_' => vec!['!', c],
            c => vec![c],
        })
        .collect();
    let mut any = Condition::any().add(
        Expr::col((addr::Entity, addr::Column::A))
            .like(LikeExpr::new(format!("%{escaped}%")).escape('!')),
    );
    if let Ok(id) = s.parse::<i64>() {
        any = any.add(addr::Column::Id.eq(id));
    }
    Some(q.filter(any))
}

#[cfg(test)]
mod tests {
    use super::super::migration;
    use super::*;
    use sea_orm::{ConnectionTrait, QueryTrait};
    use sea_orm_migration::MigratorTrait;

    /// SQLite's plan for `q`, one line per step.
    async fn plan(db: &sea_orm::DatabaseConnection, q: Select<addr::Entity>) -> Vec<String> {
        let mut st = q.build(sea_orm::DbBackend::Sqlite);
        st.sql = format!("EXPLAIN QUERY PLAN {}", st.sql);
        db.query_all_raw(st)
            .await
            .expect("the plan")
            .iter()
            .filter_map(|r| r.try_get::<String>("", "detail").ok())
            .collect()
    }

    #[tokio::test]
    async fn a_whole_address_is_looked_up_not_searched_for() {
        let db = migration::memory_database().await;
        migration::Migrator::up(&db, None)
            .await
            .expect("all migrations");
        let whole = "a".repeat(ADDR_LEN);
        let looked_up = plan(&db, addr_page_select(Some(&whole), None).expect("a query")).await;
        assert!(
            looked_up
                .iter()
                .any(|d| d.contains("USING INDEX") && d.contains("(a=?)")),
            "{looked_up:?}"
        );
        // A part of an address is still searched for, by substring.
        let part = plan(&db, addr_page_select(Some("aaa"), None).expect("a query")).await;
        assert!(!part.iter().any(|d| d.contains("(a=?)")), "{part:?}");
        assert!(addr_page_select(Some(&format!("{whole}a")), None).is_none());
    }
}
