//! Accepted events and their deliveries once written (the group commit
//! that writes them is `group_commit`): leases and claims of due
//! deliveries, and the events API (history, retry, retention).

use std::time::Duration;

use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};

use sea_orm::QuerySelect;

use super::deletion::{endpoints_taken, refuse_taken};
use super::entity::{addr, delivery, endpoint, event};
use super::{Result, Store, StoreError};
use crate::config::DbBackend;

/// State of a delivery still to be made.
pub const STATE_PENDING: &str = "pending";
/// State of a delivery the plugin accepted.
pub const STATE_DELIVERED: &str = "delivered";
/// State of a delivery given up after its retries.
pub const STATE_FAILED: &str = "failed";

/// A claim of due deliveries that failed: why, and the deliveries it may
/// have leased all the same, whose leases the claimer must free (its
/// `COMMIT` reached the database, but the answer was lost).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct ClaimError {
    pub error: StoreError,
    /// (event id, endpoint id) of each delivery the claim may hold.
    pub in_doubt: Vec<(String, i64)>,
}

impl<E: Into<StoreError>> From<E> for ClaimError {
    fn from(e: E) -> ClaimError {
        ClaimError {
            error: e.into(),
            in_doubt: Vec::new(),
        }
    }
}

/// What a claim read and leased, its transaction still open: the
/// transaction, the deliveries, their events by id, and their endpoints
/// by id with whether each one's address is active.
type ClaimRead = (
    sea_orm::DatabaseTransaction,
    Vec<delivery::Model>,
    std::collections::HashMap<String, std::sync::Arc<EventHead>>,
    std::collections::HashMap<i64, (endpoint::Model, bool)>,
);

/// A due delivery claimed ([`Store::claim_due`]) with its event, its
/// endpoint and whether its address is active, all read in the claim's
/// transaction.
#[derive(Debug)]
pub struct Due {
    pub delivery: delivery::Model,
    pub event: std::sync::Arc<EventHead>,
    pub endpoint: endpoint::Model,
    pub addr_active: bool,
}

/// An endpoint's deliveries of the events still kept, by state, and the
/// newest error any of them got.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub delivered: i64,
    pub failed: i64,
    pub pending: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// An event without its media: every other column, and the media's size.
/// Queued deliveries and the events API hold these; only a delivery's
/// call reads the media ([`Store::event_media`]), so a backlog of events
/// with media costs their small fields, not their media.
#[derive(Debug, Clone, PartialEq, sea_orm::FromQueryResult)]
pub struct EventHead {
    pub id: String,
    pub addr_id: i64,
    pub addr: String,
    pub msg: String,
    pub subject: String,
    pub formatted_subject: String,
    pub level: i16,
    pub location: Option<String>,
    pub tag: Option<String>,
    pub sender: Option<String>,
    pub media_fname: Option<String>,
    pub created: chrono::DateTime<chrono::Utc>,
    pub hops: i16,
    /// Bytes of media, if the event has any.
    pub media_size: Option<i64>,
}

impl EventHead {
    /// The head of an event just accepted (its media is dropped here).
    pub fn of(e: event::Model) -> EventHead {
        EventHead {
            media_size: e
                .media
                .as_ref()
                .map(|m| i64::try_from(m.len()).unwrap_or(i64::MAX)),
            id: e.id,
            addr_id: e.addr_id,
            addr: e.addr,
            msg: e.msg,
            subject: e.subject,
            formatted_subject: e.formatted_subject,
            level: e.level,
            location: e.location,
            tag: e.tag,
            sender: e.sender,
            media_fname: e.media_fname,
            created: e.created,
            hops: e.hops,
        }
    }
}

/// Events as [`EventHead`]s: every column but the media, and its length
/// as a 64-bit integer on every backend (PostgreSQL's `length(bytea)` is
/// a 32-bit one).
pub(super) fn event_heads(backend: DbBackend) -> sea_orm::Select<event::Entity> {
    use sea_orm::Iterable;
    use sea_orm::sea_query::{Alias, ExprTrait, Func};
    let length =
        Expr::expr(Func::cust("LENGTH").arg(Expr::col((event::Entity, event::Column::Media))));
    let size = match backend {
        DbBackend::Sqlite => length,
        DbBackend::Postgres => length.cast_as(Alias::new("BIGINT")),
        DbBackend::MySql => length.cast_as(Alias::new("SIGNED")),
    };
    event::Entity::find()
        .select_only()
        .columns(event::Column::iter().filter(|c| !matches!(c, event::Column::Media)))
        .column_as(size, "media_size")
}

impl Store {
    /// Frees the leases held under the name `node` (as servers before
    /// instance ids named them), so an upgraded server takes back at once
    /// what its previous version left pending.
    pub async fn release_leases(&self, node: &str) -> Result<u64> {
        let r = delivery::Entity::update_many()
            .col_expr(delivery::Column::LeaseUntil, no_lease().0)
            .col_expr(delivery::Column::LeasedBy, no_lease().1)
            .filter(delivery::Column::LeasedBy.eq(node))
            .filter(pending())
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected)
    }

    /// Frees `node`'s leases of the pending deliveries `keys` (event id,
    /// endpoint id), a chunk of one endpoint's at a time; how many.
    pub async fn release_leases_of(&self, node: &str, keys: &[(String, i64)]) -> Result<u64> {
        let mut n = 0;
        for (endpoint_id, events) in by_endpoint(keys) {
            for chunk in events.chunks(DELETE_CHUNK as usize) {
                n += delivery::Entity::update_many()
                    .col_expr(delivery::Column::LeaseUntil, no_lease().0)
                    .col_expr(delivery::Column::LeasedBy, no_lease().1)
                    .filter(leased_to(node, endpoint_id, chunk.iter().copied()))
                    .exec(&self.db)
                    .await?
                    .rows_affected;
            }
        }
        Ok(n)
    }

    /// How many of the deliveries `keys` (event id, endpoint id) are no
    /// longer there: deleted with their endpoint or address (or with
    /// their event, once settled).
    pub async fn deliveries_gone(&self, keys: &[(String, i64)]) -> Result<u64> {
        use sea_orm::PaginatorTrait;
        let mut there = 0;
        for (endpoint_id, events) in by_endpoint(keys) {
            for chunk in events.chunks(DELETE_CHUNK as usize) {
                there += delivery::Entity::find()
                    .filter(delivery::Column::EndpointId.eq(endpoint_id))
                    .filter(delivery::Column::EventId.is_in(chunk.iter().copied()))
                    .count(&self.db)
                    .await?;
            }
        }
        Ok((keys.len() as u64).saturating_sub(there))
    }

    /// Claims up to `limit` due pending deliveries whose lease is free or
    /// another node's and expired, leasing them to `node`; returns each
    /// with its event and endpoint. Rows another server is claiming at the
    /// same moment are skipped (`FOR UPDATE SKIP LOCKED` where the
    /// database has it).
    ///
    /// `node`'s own leases are never taken again, expired or not: each is
    /// of a call in flight, whose outcome ends it, of an outcome given up
    /// on, whose lease the writer frees, of a group commit the writer saw
    /// fail, whose events it deletes, or of a claim that failed but may
    /// hold it, which the sweeper frees; `node` renews them all, so it
    /// took none back but by the clock, and a wall clock stepped forward
    /// (a first NTP sync, a VM resumed) made the calls in flight look
    /// expired: they were made a second time. Two kinds stay held until
    /// the node restarts, as the renewal already kept them: what the
    /// writer gives up on past the bound of what it remembers, and the
    /// deliveries of a group commit that took effect later than `timeout`
    /// after the writer saw it fail (see `pipeline::unsettled`). A claim
    /// whose own `COMMIT` may have taken effect though it failed says
    /// which deliveries it may hold ([`ClaimError`]), for the caller to
    /// free.
    ///
    /// It waits for the database `within` in all, then fails
    /// ([`StoreError::Unanswered`]; its `COMMIT` unanswered, in doubt): a
    /// connection that falls silent (a database host that vanished, with
    /// no reset reaching this one) held the sweeper, and every retry and
    /// put-off on this node, until TCP gave up on it, about 15 minutes.
    pub async fn claim_due(
        &self,
        node: &str,
        lease_until: chrono::DateTime<chrono::Utc>,
        limit: u64,
        within: std::time::Duration,
    ) -> std::result::Result<Vec<Due>, ClaimError> {
        let deadline = tokio::time::Instant::now() + within;
        let unanswered = || StoreError::Unanswered(within);
        // Dropped unfinished, its transaction took no effect: rolled back
        // by the pool, or by the database once the session ends.
        let Ok(read) =
            tokio::time::timeout_at(deadline, self.claim_read(node, lease_until, limit)).await
        else {
            return Err(unanswered().into());
        };
        let Some((txn, due, events, eps)) = read? else {
            return Ok(Vec::new());
        };
        let in_doubt = || {
            due.iter()
                .map(|d| (d.event_id.clone(), d.endpoint_id))
                .collect()
        };
        match tokio::time::timeout_at(deadline, txn.commit()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let error = StoreError::from(e);
                let in_doubt = match error.took_no_effect() {
                    true => Vec::new(),
                    false => in_doubt(),
                };
                return Err(ClaimError { error, in_doubt });
            }
            Err(_) => {
                return Err(ClaimError {
                    error: unanswered(),
                    in_doubt: in_doubt(),
                });
            }
        }
        Ok(due
            .into_iter()
            .filter_map(|d| {
                let event = events.get(&d.event_id)?.clone();
                let (endpoint, addr_active) = eps.get(&d.endpoint_id)?.clone();
                Some(Due {
                    delivery: d,
                    event,
                    endpoint,
                    addr_active,
                })
            })
            .collect())
    }

    /// A claim's work before its `COMMIT`: the due deliveries read and
    /// leased, with their events and endpoints, in its transaction, left
    /// open; `None` when none is due (committed already).
    async fn claim_read(
        &self,
        node: &str,
        lease_until: chrono::DateTime<chrono::Utc>,
        limit: u64,
    ) -> Result<Option<ClaimRead>> {
        use sea_orm::{QuerySelect, sea_query::LockBehavior, sea_query::LockType};
        let now = chrono::Utc::now();
        let txn = self.begin_write().await?;
        let mut q = delivery::Entity::find()
            .filter(pending())
            .filter(delivery::Column::NextAt.lte(now))
            .filter(
                sea_orm::Condition::any()
                    .add(delivery::Column::LeaseUntil.is_null())
                    .add(
                        sea_orm::Condition::all()
                            .add(delivery::Column::LeaseUntil.lt(now))
                            .add(delivery::Column::LeasedBy.ne(node)),
                    ),
            )
            .order_by_asc(delivery::Column::NextAt)
            .limit(limit);
        if self.backend != DbBackend::Sqlite {
            q = q.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
        let due = q.all(&txn).await?;
        if due.is_empty() {
            txn.commit().await?;
            return Ok(None);
        }
        let ids: Vec<i64> = due.iter().map(|d| d.id).collect();
        delivery::Entity::update_many()
            .col_expr(delivery::Column::LeaseUntil, Expr::value(lease_until))
            .col_expr(delivery::Column::LeasedBy, Expr::value(node))
            .filter(delivery::Column::Id.is_in(ids))
            .exec(&txn)
            .await?;
        let event_ids: Vec<String> = due.iter().map(|d| d.event_id.clone()).collect();
        let ep_ids: Vec<i64> = due.iter().map(|d| d.endpoint_id).collect();
        let events: std::collections::HashMap<String, std::sync::Arc<EventHead>> =
            event_heads(self.backend)
                .filter(event::Column::Id.is_in(event_ids))
                .into_model::<EventHead>()
                .all(&txn)
                .await?
                .into_iter()
                .map(|e| (e.id.clone(), std::sync::Arc::new(e)))
                .collect();
        let eps: std::collections::HashMap<i64, (endpoint::Model, bool)> = endpoint::Entity::find()
            .filter(endpoint::Column::Id.is_in(ep_ids))
            .find_also_related(addr::Entity)
            .all(&txn)
            .await?
            .into_iter()
            .map(|(e, a)| (e.id, (e, a.is_some_and(|a| a.active == 1))))
            .collect();
        Ok(Some((txn, due, events, eps)))
    }

    // ---- events API --------------------------------------------------------

    /// The newest `limit` events of an address, newest first.
    pub async fn event_list(&self, addr_id: i64, limit: u64) -> Result<Vec<EventHead>> {
        Ok(event_heads(self.backend)
            .filter(event::Column::AddrId.eq(addr_id))
            .order_by_desc(event::Column::Created)
            // Times may tie (to the microsecond); ids are UUIDv7, whose
            // text sorts by time to the millisecond.
            .order_by_desc(event::Column::Id)
            .limit(limit)
            .into_model::<EventHead>()
            .all(&self.db)
            .await?)
    }

    /// An event's media, read for one delivery call.
    pub async fn event_media(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let media: Option<Option<Vec<u8>>> = event::Entity::find_by_id(id.to_string())
            .select_only()
            .column(event::Column::Media)
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(media.flatten())
    }

    /// One event of an address, with its deliveries.
    pub async fn event_get(
        &self,
        addr_id: i64,
        id: &str,
    ) -> Result<(EventHead, Vec<delivery::Model>)> {
        let e = event_heads(self.backend)
            .filter(event::Column::Id.eq(id))
            .filter(event::Column::AddrId.eq(addr_id))
            .into_model::<EventHead>()
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("event {id}")))?;
        let d = delivery::Entity::find()
            .filter(delivery::Column::EventId.eq(id))
            .order_by_asc(delivery::Column::EndpointId)
            .all(&self.db)
            .await?;
        Ok((e, d))
    }

    /// How an endpoint's deliveries stand (see [`EndpointStats`]); two
    /// queries on the endpoint's index.
    pub async fn endpoint_delivery_stats(&self, endpoint_id: i64) -> Result<EndpointStats> {
        let counts: Vec<(String, i64)> = delivery::Entity::find()
            .select_only()
            .column(delivery::Column::State)
            .column_as(delivery::Column::Id.count(), "n")
            .filter(delivery::Column::EndpointId.eq(endpoint_id))
            .group_by(delivery::Column::State)
            .into_tuple()
            .all(&self.db)
            .await?;
        let mut s = EndpointStats::default();
        for (state, n) in counts {
            match state.as_str() {
                STATE_DELIVERED => s.delivered = n,
                STATE_FAILED => s.failed = n,
                STATE_PENDING => s.pending = n,
                _ => {}
            }
        }
        let last: Option<(Option<String>, chrono::DateTime<chrono::Utc>)> =
            delivery::Entity::find()
                .select_only()
                .column(delivery::Column::LastError)
                .column(delivery::Column::Updated)
                .filter(delivery::Column::EndpointId.eq(endpoint_id))
                .filter(delivery::Column::LastError.is_not_null())
                .order_by_desc(delivery::Column::Updated)
                .into_tuple()
                .one(&self.db)
                .await?;
        if let Some((error, at)) = last {
            s.last_error = error;
            s.last_error_at = Some(at);
        }
        Ok(s)
    }

    /// Pending deliveries per plugin, over the whole cluster: the
    /// `delivery_pending` index (as long as what is pending, not the
    /// table; on MySQL a range of `delivery_due`) joined to the endpoints.
    pub async fn pending_by_plugin(&self) -> Result<Vec<(String, i64)>> {
        Ok(delivery::Entity::find()
            .select_only()
            .column(endpoint::Column::PluginName)
            .column_as(delivery::Column::Id.count(), "n")
            .join(
                sea_orm::JoinType::InnerJoin,
                delivery::Entity::belongs_to(endpoint::Entity)
                    .from(delivery::Column::EndpointId)
                    .to(endpoint::Column::Id)
                    .into(),
            )
            .filter(pending())
            .group_by(endpoint::Column::PluginName)
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// Puts off `node`'s leased pending deliveries of the events
    /// `event_ids` to `endpoint_id`: due again at `until`, `why` as their
    /// last error, their attempts unchanged, their leases released; how
    /// many. Fenced as an outcome is: only while `node` still holds them.
    pub async fn put_off(
        &self,
        node: &str,
        endpoint_id: i64,
        event_ids: Vec<String>,
        until: chrono::DateTime<chrono::Utc>,
        why: &str,
    ) -> Result<u64> {
        let r = delivery::Entity::update_many()
            .col_expr(delivery::Column::NextAt, Expr::value(until))
            .col_expr(delivery::Column::LastError, Expr::value(why))
            .col_expr(delivery::Column::Updated, Expr::value(chrono::Utc::now()))
            .col_expr(delivery::Column::LeaseUntil, no_lease().0)
            .col_expr(delivery::Column::LeasedBy, no_lease().1)
            .filter(leased_to(node, endpoint_id, event_ids))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected)
    }

    /// Makes an event's failed deliveries pending again, due now, but
    /// those to an endpoint being deleted; refused (409) while its address
    /// is being deleted ([`refuse_taken`]; not a routing change, so one
    /// racing the deletion's begin makes them due, and they are deleted
    /// with the rest, maybe delivered first).
    pub async fn event_retry(&self, addr_id: i64, id: &str) -> Result<u64> {
        self.event_get(addr_id, id).await?;
        refuse_taken(&self.db, addr_id, None).await?;
        let r = failed_made_due()
            .filter(delivery::Column::EventId.eq(id))
            .filter(delivery::Column::EndpointId.not_in_subquery(endpoints_taken()))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected)
    }

    /// Makes an endpoint's failed deliveries (of the events still kept)
    /// pending again, due now; how many. They are found and changed
    /// [`DELETE_CHUNK`] at a time ([`by_chunks`]), each chunk its own
    /// short statement, so an endpoint with a long history of failures
    /// neither holds the write lock long nor makes a large transaction.
    /// Refused (409) while the endpoint (of address `addr_id`) is being
    /// deleted, as [`Store::event_retry`] is.
    pub async fn endpoint_retry(&self, addr_id: i64, endpoint_id: i64) -> Result<u64> {
        refuse_taken(&self.db, addr_id, Some(endpoint_id)).await?;
        let failed = delivery::Entity::find()
            .filter(delivery::Column::EndpointId.eq(endpoint_id))
            .filter(delivery::Column::State.eq(STATE_FAILED));
        let retry = |chunk: Vec<i64>| async move {
            let r = failed_made_due()
                .filter(delivery::Column::Id.is_in(chunk))
                .exec(&self.db)
                .await?;
            Ok(r.rows_affected)
        };
        by_chunks((&self.db, self.step), failed, delivery::Column::Id, retry).await
    }

    /// Makes an endpoint's pending deliveries that wait for a later try (a
    /// backoff after a failure, or the wait its target asked for) due now,
    /// their attempts unchanged; how many. Called once its settings
    /// changed (what they waited for was an answer to the old ones), or
    /// once it or its address is enabled again (they waited for that). A
    /// chunk at a time, as [`Store::endpoint_retry`]; the ones a node holds
    /// at that moment are left to their outcome.
    ///
    /// The state is said as what it is not, unlike [`pending()`]: the walk
    /// must go by the endpoint and the id, and never through
    /// `delivery_pending`, which holds every pending delivery of every
    /// endpoint. PostgreSQL, its statistics made before the backlog,
    /// planned each chunk's update as a walk of that index (about a
    /// second a chunk with 150,000 waiting). The update names each row by
    /// its id alone for the same reason: the ids were read for this
    /// endpoint.
    pub async fn endpoint_waiting_made_due(&self, endpoint_id: i64) -> Result<u64> {
        let now = chrono::Utc::now();
        let waiting = || {
            sea_orm::Condition::all()
                .add(delivery::Column::State.is_not_in([STATE_DELIVERED, STATE_FAILED]))
                .add(delivery::Column::LeasedBy.is_null())
                .add(delivery::Column::NextAt.gt(now))
        };
        let rows = delivery::Entity::find()
            .filter(delivery::Column::EndpointId.eq(endpoint_id))
            .filter(waiting());
        let due = |chunk: Vec<i64>| async move {
            let r = delivery::Entity::update_many()
                .col_expr(delivery::Column::NextAt, Expr::value(now))
                .col_expr(delivery::Column::Updated, Expr::value(now))
                .filter(waiting())
                .filter(delivery::Column::Id.is_in(chunk))
                .exec(&self.db)
                .await?;
            Ok(r.rows_affected)
        };
        by_chunks((&self.db, self.step), rows, delivery::Column::Id, due).await
    }

    /// [`Store::endpoint_waiting_made_due`] for each endpoint of an
    /// address, once it is enabled again; how many in all.
    pub async fn addr_waiting_made_due(&self, addr_id: i64) -> Result<u64> {
        self.endpoints_waiting_made_due(endpoint::Column::AddrId.eq(addr_id))
            .await
    }

    /// [`Store::endpoint_waiting_made_due`] for each endpoint of a
    /// plugin, once a reload has started it or started it anew (its
    /// deliveries waited for it to run, or for an answer under its old
    /// settings); how many in all.
    pub async fn plugin_waiting_made_due(&self, plugin: &str) -> Result<u64> {
        self.endpoints_waiting_made_due(endpoint::Column::PluginName.eq(plugin))
            .await
    }

    /// [`Store::endpoint_waiting_made_due`] for each endpoint `which`
    /// selects, one after the other; how many in all.
    async fn endpoints_waiting_made_due(
        &self,
        which: sea_orm::sea_query::SimpleExpr,
    ) -> Result<u64> {
        let read = async {
            Ok(endpoint::Entity::find()
                .select_only()
                .column(endpoint::Column::Id)
                .filter(which)
                .into_tuple()
                .all(&self.db)
                .await?)
        };
        let endpoints: Vec<i64> = super::within(self.step, read).await?;
        let mut n = 0;
        for id in endpoints {
            n += self.endpoint_waiting_made_due(id).await?;
        }
        Ok(n)
    }

    /// Deletes events created before `before` that have nothing pending,
    /// with their deliveries (first: on PostgreSQL and MySQL no key ties a
    /// delivery to its event, migration 9). It reads and deletes
    /// [`DELETE_CHUNK`] events at a time, in the order of their ids, so
    /// its memory and each of its write transactions stay small however
    /// many events are due. The reads run outside the transactions: on
    /// SQLite they do not hold the write lock while they scan. They walk
    /// the ids only as far as [`CLEANUP_SLACK`] past `before`: an id is a
    /// UUIDv7, made when its event was, whose text sorts by that time, so
    /// the events kept are not read at all.
    pub async fn events_cleanup(&self, before: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        let last_id = first_id_made_at(before + CLEANUP_SLACK);
        let due = event::Entity::find()
            .filter(event::Column::Id.lt(last_id.as_str()))
            .filter(event::Column::Created.lt(before))
            .filter(nothing_pending());
        let delete = |chunk: Vec<String>| async move {
            let txn = self.begin_write().await?;
            // A retry may have made a delivery pending since the read.
            let doomed: Vec<String> = event::Entity::find()
                .select_only()
                .column(event::Column::Id)
                .filter(event::Column::Id.is_in(chunk))
                .filter(nothing_pending())
                .into_tuple()
                .all(&txn)
                .await?;
            let n = delete_events(&txn, doomed).await?;
            txn.commit().await?;
            Ok(n)
        };
        by_chunks((&self.db, self.step), due, event::Column::Id, delete).await
    }

    /// Deletes those of the events `ids` whose deliveries are all still
    /// pending, untried and leased to `node` (or that have none), with
    /// their deliveries; how many events. These are the events of a group
    /// commit that took effect though its writer saw it fail: their pushes
    /// were told 503, and nothing but `node` has touched them since.
    pub async fn withdraw_events(&self, node: &str, ids: &[String]) -> Result<u64> {
        use sea_orm::Condition;
        // Its transactions come from the pool, where the writer's kept
        // connection must be for them to find one on SQLite.
        self.writer_waits();
        let mut n = 0;
        for chunk in ids.chunks(DELETE_CHUNK as usize) {
            let touched = Condition::any()
                .add(delivery::Column::State.ne(STATE_PENDING))
                .add(delivery::Column::Attempts.ne(0))
                .add(delivery::Column::LeasedBy.is_null())
                .add(delivery::Column::LeasedBy.ne(node));
            let txn = self.begin_write().await?;
            let untouched: Vec<String> = event::Entity::find()
                .select_only()
                .column(event::Column::Id)
                .filter(event::Column::Id.is_in(chunk.iter().map(String::as_str)))
                .filter(no_delivery(touched))
                .into_tuple()
                .all(&txn)
                .await?;
            if !untouched.is_empty() {
                n += delete_events(&txn, untouched).await?;
            }
            txn.commit().await?;
        }
        Ok(n)
    }

    /// Deletes the events of the addresses `addrs` selects (a condition on
    /// `event.addr_id`) with their deliveries, [`DELETE_CHUNK`] at a time, each chunk in a
    /// short transaction of its own: an address's whole history never
    /// holds the write lock (on SQLite, every push's commit) at once.
    /// It takes as many chunks as the events counted at its start fill:
    /// events pushed meanwhile cannot keep it going, and what is left is
    /// the caller's final transaction's.
    pub(super) async fn history_delete(&self, addrs: sea_orm::sea_query::Expr) -> Result<()> {
        let events = || event::Entity::find().filter(addrs.clone());
        self.delete_counted(events, event::Column::Id, |chunk: Vec<String>| async move {
            let txn = self.begin_write().await?;
            delete_events(&txn, chunk).await?;
            Ok(txn.commit().await?)
        })
        .await
    }

    /// Deletes the deliveries of endpoint `endpoint_id`, [`DELETE_CHUNK`]
    /// at a time, as [`Store::history_delete`] does events.
    pub(super) async fn endpoint_history_delete(&self, endpoint_id: i64) -> Result<()> {
        let deliveries =
            || delivery::Entity::find().filter(delivery::Column::EndpointId.eq(endpoint_id));
        self.delete_counted(
            deliveries,
            delivery::Column::Id,
            |chunk: Vec<i64>| async move {
                let txn = self.begin_write().await?;
                delivery::Entity::delete_many()
                    .filter(delivery::Column::Id.is_in(chunk))
                    .exec(&txn)
                    .await?;
                Ok(txn.commit().await?)
            },
        )
        .await
    }

    /// Deletes the rows `rows` selects, [`DELETE_CHUNK`] at a time (their
    /// `id`s read, then handed to `delete`), as many chunks as the rows
    /// counted at its start fill; each step within [`Store`]'s `step`,
    /// and tried again as [`by_chunks`] tries its own.
    async fn delete_counted<E, T, D>(
        &self,
        rows: impl Fn() -> sea_orm::Select<E>,
        id: E::Column,
        delete: impl Fn(Vec<T>) -> D,
    ) -> Result<()>
    where
        E: EntityTrait,
        E::Model: Sync,
        T: sea_orm::TryGetableMany + Clone,
        D: Future<Output = Result<()>>,
    {
        use sea_orm::PaginatorTrait;
        let count = || async { Ok(rows().count(&self.db).await?) };
        let mut turns = tried(self.step, count).await? / DELETE_CHUNK + 1;
        loop {
            let read = || async {
                Ok(rows()
                    .select_only()
                    .column(id)
                    .limit(DELETE_CHUNK)
                    .into_tuple()
                    .all(&self.db)
                    .await?)
            };
            let chunk: Vec<T> = tried(self.step, read).await?;
            let full = chunk.len() as u64 == DELETE_CHUNK;
            if !chunk.is_empty() {
                tried(self.step, || delete(chunk.clone())).await?;
            }
            turns -= 1;
            if !full || turns == 0 {
                return Ok(());
            }
        }
    }
}

/// Rows a bulk deletion (retention, an address's or an endpoint's
/// history) reads and deletes at a time: what it holds in memory, and the
/// size of each of its write transactions.
const DELETE_CHUNK: u64 = 500;

/// Deletes events `ids` and their deliveries (first: on PostgreSQL and
/// MySQL no key ties a delivery to its event); returns how many events.
async fn delete_events<C: sea_orm::ConnectionTrait>(c: &C, ids: Vec<String>) -> Result<u64> {
    delivery::Entity::delete_many()
        .filter(delivery::Column::EventId.is_in(ids.clone()))
        .exec(c)
        .await?;
    Ok(event::Entity::delete_many()
        .filter(event::Column::Id.is_in(ids))
        .exec(c)
        .await?
        .rows_affected)
}

/// `event` has no pending delivery.
fn nothing_pending() -> Expr {
    no_delivery(sea_orm::Condition::all().add(pending()))
}

/// `event` has no delivery that meets `cond`.
fn no_delivery(cond: sea_orm::Condition) -> Expr {
    use sea_orm::sea_query::{ExprTrait, Query};
    Expr::not_exists(
        Query::select()
            .expr(Expr::val(1))
            .from(delivery::Entity)
            .and_where(
                Expr::col((delivery::Entity, delivery::Column::EventId))
                    .equals((event::Entity, event::Column::Id)),
            )
            .cond_where(cond)
            .to_owned(),
    )
}

/// How far past a cleanup's cutoff its walk of event ids goes. An event's
/// id and its `created` are both read from the clock of the node that
/// took it, a moment apart; an event whose id is later than the cutoff by
/// more than this (a node whose clock jumped between the two readings)
/// waits for a later cleanup, none is missed for good.
const CLEANUP_SLACK: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// The least id an event made at `at` or later can have: the UUIDv7 of
/// that millisecond with all its other bits zero (`crate::event` makes
/// ids with `Uuid::now_v7`).
fn first_id_made_at(at: chrono::DateTime<chrono::Utc>) -> String {
    let ms = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(ms, &[0; 10])
        .into_uuid()
        .to_string()
}

/// `delivery.state = 'pending'`, the state written into the SQL rather
/// than bound: it is the condition of the partial index
/// `delivery_pending`, which a plan made for any bound value (PostgreSQL's
/// generic plans) could not use.
pub(super) fn pending() -> Expr {
    sea_orm::sea_query::ExprTrait::eq(
        Expr::col((delivery::Entity, delivery::Column::State)),
        Expr::Constant(STATE_PENDING.into()),
    )
}

/// The values of a delivery's lease columns when nobody holds it.
pub(super) fn no_lease() -> (Expr, Expr) {
    (
        Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
        Expr::value(Option::<String>::None),
    )
}

/// The pending deliveries of the events `event_ids` to `endpoint_id`
/// that `node` still holds (the fencing an outcome has too).
/// The event ids of deliveries `keys` (event id, endpoint id), by
/// endpoint.
fn by_endpoint(keys: &[(String, i64)]) -> std::collections::BTreeMap<i64, Vec<&str>> {
    let mut by_endpoint: std::collections::BTreeMap<i64, Vec<&str>> = Default::default();
    for (event_id, endpoint_id) in keys {
        by_endpoint.entry(*endpoint_id).or_default().push(event_id);
    }
    by_endpoint
}

fn leased_to<V: Into<sea_orm::Value>>(
    node: &str,
    endpoint_id: i64,
    event_ids: impl IntoIterator<Item = V>,
) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(delivery::Column::EndpointId.eq(endpoint_id))
        .add(delivery::Column::EventId.is_in(event_ids))
        .add(delivery::Column::LeasedBy.eq(node))
        .add(pending())
}

/// How long a walk ([`by_chunks`], [`Store::delete_counted`]) goes on
/// trying a statement of a chunk that failed with the database out of
/// reach (unanswered within the walk's step, no connection, a connection
/// broken under it) or that lost a lock race ([`StoreError::lost_a_race`])
/// before it gives up: 30 s or three steps, whichever is longer, as the
/// server's start waits for its database. Each chunk's work can be made
/// again, and a long walk (an endpoint's backlog made due after its
/// settings changed, a retry, the cleanup, a deletion's history answered
/// 202) ended at one slow statement, or at a database restarting under
/// it, its rest left as it was.
fn chunk_patience(step: Duration) -> Duration {
    (step * 3).max(Duration::from_secs(30))
}

/// The first pause before a chunk's statement is tried again; each next
/// one is twice the last, up to [`CHUNK_PAUSE_MOST`].
const CHUNK_PAUSE: Duration = Duration::from_millis(100);

/// The longest pause between two tries of a chunk's statement.
const CHUNK_PAUSE_MOST: Duration = Duration::from_secs(2);

/// An update of failed deliveries back to pending, due now and leased to
/// no one; the caller narrows it to an event's or an endpoint's.
fn failed_made_due() -> sea_orm::UpdateMany<delivery::Entity> {
    let now = chrono::Utc::now();
    delivery::Entity::update_many()
        .col_expr(delivery::Column::State, Expr::value(STATE_PENDING))
        .col_expr(delivery::Column::NextAt, Expr::value(now))
        .col_expr(delivery::Column::LeaseUntil, no_lease().0)
        .col_expr(delivery::Column::LeasedBy, no_lease().1)
        .col_expr(delivery::Column::Updated, Expr::value(now))
        .filter(delivery::Column::State.eq(STATE_FAILED))
}

/// Works through the ids (column `id`) of the rows `rows` selects,
/// [`DELETE_CHUNK`] at a time in their order, each chunk read after the
/// last: `act` does the work on a chunk and says how many rows it
/// changed. The sum, once a chunk comes back short. A statement that
/// finds the database out of reach, or loses a lock race, is tried again
/// ([`chunk_patience`]), so `act` must do no harm made twice.
///
/// Each read resumes after the last id, so an index that gives `rows` in
/// the order of `id` (a delivery's `(endpoint_id, id)`, an event's
/// primary key) makes the whole walk one pass: a chunk costs what it
/// reads, however many rows the walk has behind or ahead of it.
async fn by_chunks<E, T, A>(
    (db, step): (&sea_orm::DatabaseConnection, Duration),
    rows: sea_orm::Select<E>,
    id: E::Column,
    act: impl Fn(Vec<T>) -> A,
) -> Result<u64>
where
    E: EntityTrait,
    T: sea_orm::TryGetableMany + Into<sea_orm::Value> + Clone,
    A: Future<Output = Result<u64>>,
{
    let mut after: Option<T> = None;
    let mut n = 0;
    loop {
        let mut q = rows
            .clone()
            .select_only()
            .column(id)
            .order_by_asc(id)
            .limit(DELETE_CHUNK);
        if let Some(after) = after.take() {
            q = q.filter(id.gt(after));
        }
        let chunk: Vec<T> =
            tried(step, || async { Ok(q.clone().into_tuple().all(db).await?) }).await?;
        let Some(last) = chunk.last().cloned() else {
            return Ok(n);
        };
        let full = chunk.len() as u64 == DELETE_CHUNK;
        n += tried(step, || act(chunk.clone())).await?;
        if !full {
            return Ok(n);
        }
        after = Some(last);
    }
}

/// `op`, each try within `step`, tried again while it fails with the
/// database out of reach or loses a lock race (a deadlock with a claim,
/// an outcome or another node's walk over the same rows), for
/// [`chunk_patience`] at most.
async fn tried<T, A>(step: Duration, op: impl Fn() -> A) -> Result<T>
where
    A: Future<Output = Result<T>>,
{
    let give_up = tokio::time::Instant::now() + chunk_patience(step);
    let mut pause = CHUNK_PAUSE;
    loop {
        let tried = super::within(step, op()).await;
        let in_time = tokio::time::Instant::now() + pause < give_up;
        match tried {
            Err(e) if e.out_of_reach() && in_time => {
                tracing::debug!(error = %e, "a walk's statement is tried again");
            }
            Err(e) if e.lost_a_race() && in_time => {
                tracing::info!(error = %e, "a walk's statement lost a lock race; trying it again");
            }
            r => return r,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(CHUNK_PAUSE_MOST);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::QueryTrait;

    use crate::store::{Attempt, GroupCommit};

    /// An event's id sorts at or after the bound of the millisecond it was
    /// made in and before the next one's, whatever its random bits, so
    /// the cleanup's walk up to a bound misses no older event.
    #[test]
    fn event_ids_sort_by_the_millisecond_they_were_made_in() {
        let id = uuid::Uuid::now_v7().to_string();
        let ms = chrono::TimeDelta::milliseconds(1);
        let (secs, nanos) = uuid::Uuid::parse_str(&id)
            .expect("an id")
            .get_timestamp()
            .expect("a v7 id has a time")
            .to_unix();
        let at = chrono::DateTime::from_timestamp(secs as i64, nanos).expect("a time");
        assert!(first_id_made_at(at) <= id, "{id} {}", first_id_made_at(at));
        assert!(id < first_id_made_at(at + ms), "{id}");
        assert!(first_id_made_at(at - ms) < first_id_made_at(at));
        // The greatest id of the millisecond before.
        let max = uuid::Builder::from_unix_timestamp_millis(
            u64::try_from((at - ms).timestamp_millis()).expect("after 1970"),
            &[0xff; 10],
        )
        .into_uuid()
        .to_string();
        assert!(max < first_id_made_at(at), "{max}");
    }

    /// Of the events of a commit that seemed to fail, only those nothing
    /// has touched since are withdrawn: each delivery still pending,
    /// untried and leased to the node that asks.
    #[tokio::test]
    async fn only_untouched_events_are_withdrawn() {
        use sea_orm::PaginatorTrait;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = super::super::sqlite_for_tests(dir.path(), "withdraw").await;
        let addr = store.addr_create().await.expect("an address");
        let ep = store
            .endpoint_create(addr.id, "t", serde_json::json!({}), None, 1)
            .await
            .expect("an endpoint");
        let event = || event::Model {
            addr_id: addr.id,
            addr: addr.a.clone(),
            ..event::Model::sample(&uuid::Uuid::now_v7().to_string())
        };
        let (untouched, tried, others) = (event(), event(), event());
        let commit =
            async |batch: Vec<(&event::Model, Vec<i64>)>, outcomes: Vec<Attempt>, node: &str| {
                store
                    .write_batch(&GroupCommit {
                        batch: &batch,
                        outcomes: &outcomes,
                        node,
                        lease_until: chrono::Utc::now() + chrono::Duration::minutes(1),
                    })
                    .await
                    .expect("a group commit");
            };
        commit(
            vec![(&untouched, vec![ep.id]), (&tried, vec![ep.id])],
            Vec::new(),
            "me",
        )
        .await;
        commit(vec![(&others, vec![ep.id])], Vec::new(), "other").await;
        let attempt = Attempt {
            event_id: tried.id.clone(),
            endpoint_id: ep.id,
            attempts: 1,
            state: STATE_PENDING,
            error: Some("failed".into()),
            next_at: Some(chrono::Utc::now()),
        };
        commit(Vec::new(), vec![attempt], "me").await;
        let ids = [&untouched, &tried, &others].map(|e| e.id.clone());
        let gone = store
            .withdraw_events("me", &[&ids[..], &["not stored".to_string()]].concat())
            .await
            .expect("withdrawn");
        assert_eq!(gone, 1);
        let left: Vec<String> = event::Entity::find()
            .select_only()
            .column(event::Column::Id)
            .order_by_asc(event::Column::Id)
            .into_tuple()
            .all(&store.db)
            .await
            .expect("the events");
        assert_eq!(left, [tried.id.clone(), others.id.clone()]);
        assert_eq!(
            delivery::Entity::find()
                .count(&store.db)
                .await
                .expect("a count"),
            2
        );
    }

    /// The pending condition is in the text, where a plan for any bound
    /// values can match it to `delivery_pending`'s.
    #[test]
    fn pending_is_written_into_the_sql() {
        for backend in [sea_orm::DbBackend::Postgres, sea_orm::DbBackend::Sqlite] {
            let st = delivery::Entity::find().filter(pending()).build(backend);
            assert!(
                st.sql.ends_with(r#"WHERE "delivery"."state" = 'pending'"#),
                "{}",
                st.sql
            );
            assert!(
                st.values.as_ref().is_none_or(|v| v.0.is_empty()),
                "{:?}",
                st.values
            );
        }
    }
}
