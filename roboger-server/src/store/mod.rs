//! Persistent state: addresses, endpoints, subscriptions, bucket objects and
//! limit counters, on SQLite (default), PostgreSQL or MySQL through sea-orm.
//!
//! Everything the API needs from the database is a method of [`Store`]; no
//! SQL is built from user input anywhere (queries go through sea-orm's
//! builder with bound values). Parent checks (an endpoint reached through
//! the wrong address is "not found") are done here, once.

pub mod entity;
pub mod migration;
pub mod named;

use std::time::Duration;

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectOptions, ConnectionTrait,
    DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder, SqlErr, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use serde_json::Value;

use crate::config::{DbBackend, DbUrl};
use crate::level::{Level, LevelMatch};
use entity::{addr, addr_limit, bucket, delivery, endpoint, event, subscription};

/// Errors of the storage layer; the API maps them to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object (or its parent) does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A unique value is already taken.
    #[error("{0}")]
    Conflict(String),
    /// The database failed or refused the operation.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

type Result<T> = std::result::Result<T, StoreError>;

/// How an address is named in a path: its numeric id or its 64-char string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrRef {
    /// `addr.id`
    Id(i64),
    /// `addr.a`
    A(String),
}

impl AddrRef {
    /// Digits alone (shorter than an address) name an id; anything else is
    /// an address string.
    pub fn parse(s: &str) -> AddrRef {
        if !s.is_empty() && s.len() < entity::ADDR_LEN && s.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(id) = s.parse() {
                return AddrRef::Id(id);
            }
        }
        AddrRef::A(s.to_string())
    }
}

impl std::fmt::Display for AddrRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddrRef::Id(i) => write!(f, "{i}"),
            AddrRef::A(a) => f.write_str(a),
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

/// Bound parameters per insert statement at most (rows × columns).
const INSERT_CHUNK: usize = 16_000;

/// State of a delivery still to be made.
pub const STATE_PENDING: &str = "pending";
/// State of a delivery the plugin accepted.
pub const STATE_DELIVERED: &str = "delivered";
/// State of a delivery given up after its retries.
pub const STATE_FAILED: &str = "failed";

/// The outcome of one delivery attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub event_id: String,
    pub endpoint_id: i64,
    /// Attempts made so far, this one included.
    pub attempts: i32,
    pub state: &'static str,
    pub error: Option<String>,
    /// When a pending delivery is due again.
    pub next_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A bucket object to store.
#[derive(Debug, Clone)]
pub struct NewObject {
    pub creator: String,
    pub addr_id: Option<i64>,
    pub mimetype: String,
    pub fname: Option<String>,
    pub public: bool,
    pub metadata: Value,
    pub expires: Duration,
    pub content: Vec<u8>,
}

/// A subscription with the address id it belongs to (as the API shows it).
#[derive(Debug, Clone)]
pub struct SubscriptionRow {
    pub addr_id: i64,
    pub sub: subscription::Model,
}

/// The database, with every query the server makes.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// Where [`Store::begin_write`] opens its transactions: on SQLite, a
    /// pool of one connection (its own on a file), which queues them;
    /// elsewhere `db`.
    writes: DatabaseConnection,
    backend: DbBackend,
}

impl Store {
    /// Connects (creating a SQLite file when needed), with `timeout` on
    /// connecting and on taking a connection from the pool.
    pub async fn connect(url: &DbUrl, pool: u32, timeout: Duration) -> Result<Store> {
        if url.backend == DbBackend::Sqlite {
            if let Some(dir) = sqlite_parent_dir(&url.url) {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    DbErr::Custom(format!("cannot create directory {}: {e}", dir.display()))
                })?;
            }
        }
        let mut opts = ConnectOptions::new(url.url.clone());
        opts.max_connections(pool)
            .min_connections(1)
            .connect_timeout(timeout)
            .acquire_timeout(timeout)
            .sqlx_logging(false);
        if url.backend == DbBackend::Sqlite {
            // On every pooled connection: WAL lets readers proceed during
            // writes; FULL makes each commit durable before the 202.
            opts.map_sqlx_sqlite_opts(|o| {
                use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
            });
        }
        let memory = url.url == "sqlite::memory:";
        if memory {
            // Each in-memory connection would be a separate database.
            opts.max_connections(1);
        }
        let db = sea_orm::Database::connect(opts.clone()).await?;
        let writes = if url.backend == DbBackend::Sqlite && !memory {
            opts.max_connections(1);
            sea_orm::Database::connect(opts).await?
        } else {
            db.clone()
        };
        Ok(Store {
            db,
            writes,
            backend: url.backend,
        })
    }

    /// Begins a write transaction. SQLite has one writer at a time, and a
    /// second one waits in SQLite's busy handler, which sleeps in steps of
    /// milliseconds (or fails at once when a read lock must be upgraded).
    /// On SQLite `writes` has a single connection, so its pool queues the
    /// writers instead (fairly, within the acquire timeout), keeping group
    /// commits back to back on one warm connection and sqlx thread.
    async fn begin_write(&self) -> Result<sea_orm::DatabaseTransaction> {
        Ok(self.writes.begin().await?)
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<()> {
        migration::Migrator::up(&self.db, None).await?;
        Ok(())
    }

    /// Which backend this is.
    pub fn backend(&self) -> DbBackend {
        self.backend
    }

    /// A round trip to the database.
    pub async fn ping(&self) -> Result<()> {
        self.db.execute_unprepared("SELECT 1").await?;
        Ok(())
    }

    // ---- addresses -------------------------------------------------------

    /// Every address, by id.
    pub async fn addr_list(&self) -> Result<Vec<addr::Model>> {
        Ok(addr::Entity::find()
            .order_by_asc(addr::Column::Id)
            .all(&self.db)
            .await?)
    }

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

    /// Creates an address with a fresh random 64-char string.
    pub async fn addr_create(&self) -> Result<addr::Model> {
        for _ in 0..3 {
            let am = addr::ActiveModel {
                a: Set(crate::random::alphanumeric(entity::ADDR_LEN)),
                active: Set(1),
                lim_c: Set(100),
                lim_s: Set(10_000_000),
                ..Default::default()
            };
            match am.insert(&self.db).await {
                Ok(m) => return Ok(m),
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
        Ok(am.update(&self.db).await?)
    }

    /// Renames an address (to `to`, or a fresh random one) and returns it.
    pub async fn addr_change(&self, r: &AddrRef, to: Option<String>) -> Result<addr::Model> {
        let current = self.addr_get(r).await?;
        let mut am: addr::ActiveModel = current.into();
        am.a = Set(to.unwrap_or_else(|| crate::random::alphanumeric(entity::ADDR_LEN)));
        am.update(&self.db).await.map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict("resource already exists: that address is taken".into())
            } else {
                e.into()
            }
        })
    }

    /// Deletes an address with its endpoints, subscriptions, bucket objects
    /// and counters.
    pub async fn addr_delete(&self, r: &AddrRef) -> Result<()> {
        let a = self.addr_get(r).await?;
        let txn = self.begin_write().await?;
        delete_addr_children(&txn, Some(a.id)).await?;
        addr::Entity::delete_by_id(a.id).exec(&txn).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Deletes every address and everything that hangs off them.
    pub async fn delete_everything(&self) -> Result<()> {
        let txn = self.begin_write().await?;
        delete_addr_children(&txn, None).await?;
        addr::Entity::delete_many().exec(&txn).await?;
        txn.commit().await?;
        Ok(())
    }

    // ---- endpoints -------------------------------------------------------

    /// The endpoints of an address, by id.
    pub async fn endpoint_list(&self, addr_id: i64) -> Result<Vec<endpoint::Model>> {
        Ok(endpoint::Entity::find()
            .filter(endpoint::Column::AddrId.eq(addr_id))
            .order_by_asc(endpoint::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// One endpoint, only if it belongs to `addr_id`.
    pub async fn endpoint_get(&self, addr_id: i64, id: i64) -> Result<endpoint::Model> {
        endpoint::Entity::find_by_id(id)
            .filter(endpoint::Column::AddrId.eq(addr_id))
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("endpoint {addr_id}/{id}")))
    }

    /// Creates an endpoint (the caller has validated the config).
    pub async fn endpoint_create(
        &self,
        addr_id: i64,
        plugin_name: &str,
        config: Value,
        description: Option<String>,
    ) -> Result<endpoint::Model> {
        let am = endpoint::ActiveModel {
            addr_id: Set(addr_id),
            plugin_name: Set(plugin_name.to_string()),
            config: Set(config),
            active: Set(1),
            description: Set(description),
            ..Default::default()
        };
        Ok(am.insert(&self.db).await?)
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
        Ok(am.update(&self.db).await?)
    }

    /// Deletes an endpoint that belongs to `addr_id`, with its subscriptions.
    pub async fn endpoint_delete(&self, addr_id: i64, id: i64) -> Result<()> {
        let ep = self.endpoint_get(addr_id, id).await?;
        let txn = self.begin_write().await?;
        delivery::Entity::delete_many()
            .filter(delivery::Column::EndpointId.eq(ep.id))
            .exec(&txn)
            .await?;
        subscription::Entity::delete_many()
            .filter(subscription::Column::EndpointId.eq(ep.id))
            .exec(&txn)
            .await?;
        endpoint::Entity::delete_by_id(ep.id).exec(&txn).await?;
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
            StoreError::NotFound(_) => {
                StoreError::NotFound(format!("target endpoint {addr_id}/{to}"))
            }
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
            .await?;
        }
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
        let not_found =
            || StoreError::NotFound(format!("subscription {addr_id}/{endpoint_id}/{id}"));
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
        let sub = am.insert(&self.db).await?;
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
            am.update(&self.db).await?
        } else {
            current
        };
        Ok(SubscriptionRow { addr_id, sub })
    }

    /// Deletes a subscription reached through its own parents.
    pub async fn subscription_delete(&self, addr_id: i64, endpoint_id: i64, id: i64) -> Result<()> {
        let row = self.subscription_get(addr_id, endpoint_id, id).await?;
        subscription::Entity::delete_by_id(row.sub.id)
            .exec(&self.db)
            .await?;
        Ok(())
    }

    // ---- bucket ----------------------------------------------------------

    /// Stores a new, immutable object and returns its id.
    pub async fn bucket_put(&self, o: NewObject) -> Result<String> {
        let now = chrono::Utc::now();
        let id = crate::bucket::object_id(&o.content, &o.creator, o.addr_id, now);
        let expires = o.expires.as_secs() as i64;
        let am = bucket::ActiveModel {
            id: Set(id.clone()),
            creator: Set(o.creator),
            addr_id: Set(o.addr_id),
            mimetype: Set(o.mimetype),
            fname: Set(o.fname),
            size: Set(o.content.len() as i64),
            public: Set(o.public),
            metadata: Set(Some(o.metadata)),
            d: Set(now),
            da: Set(None),
            expires: Set(expires),
            expires_at: Set(now + chrono::Duration::seconds(expires)),
            content: Set(o.content),
        };
        am.insert(&self.db).await.map_err(|e| {
            if matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_))) {
                StoreError::NotFound("addr of the bucket object".into())
            } else {
                e.into()
            }
        })?;
        Ok(id)
    }

    /// An unexpired object; with `public`, only one whose flag matches.
    pub async fn bucket_get(&self, id: &str, public: Option<bool>) -> Result<bucket::Model> {
        let mut q = bucket::Entity::find_by_id(id.to_string())
            .filter(bucket::Column::ExpiresAt.gt(chrono::Utc::now()));
        if let Some(p) = public {
            q = q.filter(bucket::Column::Public.eq(p));
        }
        q.one(&self.db)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("bucket object {id}")))
    }

    /// Sets an unexpired object's access time.
    pub async fn bucket_touch(&self, id: &str) -> Result<()> {
        let r = bucket::Entity::update_many()
            .col_expr(
                bucket::Column::Da,
                sea_orm::sea_query::Expr::value(chrono::Utc::now()),
            )
            .filter(bucket::Column::Id.eq(id))
            .filter(bucket::Column::ExpiresAt.gt(chrono::Utc::now()))
            .exec(&self.db)
            .await?;
        if r.rows_affected == 0 {
            return Err(StoreError::NotFound(format!("bucket object {id}")));
        }
        Ok(())
    }

    /// Deletes an object.
    pub async fn bucket_delete(&self, id: &str) -> Result<()> {
        let r = bucket::Entity::delete_by_id(id.to_string())
            .exec(&self.db)
            .await?;
        if r.rows_affected == 0 {
            return Err(StoreError::NotFound(format!("bucket object {id}")));
        }
        Ok(())
    }

    // ---- plugin database access --------------------------------------------

    /// Runs a plugin's query with named `:params`; rows as JSON objects.
    pub async fn plugin_query(
        &self,
        sql: &str,
        params: &serde_json::Map<String, Value>,
    ) -> Result<Vec<Value>> {
        use sea_orm::FromQueryResult;
        let stmt = self.named_statement(sql, params)?;
        let rows = self.db.query_all_raw(stmt).await?;
        rows.iter()
            .map(|r| {
                let mut v = Value::from_query_result(r, "")?;
                // SQLite reports no type for computed columns; decode those
                // by trying the storage classes in turn.
                if let Value::Object(m) = &mut v {
                    for name in r.column_names() {
                        if !m.contains_key(&name) {
                            m.insert(name.clone(), named::untyped_column(r, &name));
                        }
                    }
                }
                Ok(v)
            })
            .collect()
    }

    /// Runs a plugin's statement with named `:params`; rows affected.
    pub async fn plugin_execute(
        &self,
        sql: &str,
        params: &serde_json::Map<String, Value>,
    ) -> Result<u64> {
        let stmt = self.named_statement(sql, params)?;
        Ok(self.db.execute_raw(stmt).await?.rows_affected())
    }

    fn named_statement(
        &self,
        sql: &str,
        params: &serde_json::Map<String, Value>,
    ) -> Result<sea_orm::Statement> {
        let backend = self.db.get_database_backend();
        let (sql, names) =
            crate::store::named::positional(sql, backend == sea_orm::DbBackend::Postgres);
        let mut values = Vec::with_capacity(names.len());
        for n in names {
            let v = params
                .get(&n)
                .ok_or_else(|| StoreError::NotFound(format!("parameter :{n}")))?;
            values.push(named::to_value(v));
        }
        Ok(sea_orm::Statement::from_sql_and_values(
            backend, sql, values,
        ))
    }

    // ---- routing and deliveries ------------------------------------------

    /// Addresses, endpoints and subscriptions (of one address, or all),
    /// for the routing index.
    pub async fn routing_snapshot(
        &self,
        addr_id: Option<i64>,
    ) -> Result<(
        Vec<addr::Model>,
        Vec<endpoint::Model>,
        Vec<subscription::Model>,
    )> {
        let mut addrs = addr::Entity::find();
        let mut eps = endpoint::Entity::find();
        if let Some(id) = addr_id {
            addrs = addrs.filter(addr::Column::Id.eq(id));
            eps = eps.filter(endpoint::Column::AddrId.eq(id));
        }
        let addrs = addrs.all(&self.db).await?;
        let eps = eps.order_by_asc(endpoint::Column::Id).all(&self.db).await?;
        let mut subs = subscription::Entity::find();
        if addr_id.is_some() {
            subs = subs.filter(
                subscription::Column::EndpointId
                    .is_in(eps.iter().map(|e| e.id).collect::<Vec<_>>()),
            );
        }
        let subs = subs.all(&self.db).await?;
        Ok((addrs, eps, subs))
    }

    /// One write transaction of the pipeline (group commit): accepted
    /// events with a delivery per endpoint, leased by `node` until
    /// `lease_until` since this server dispatches them at once, and the
    /// outcomes of delivery attempts. One transaction for both halves the
    /// commits (and fsyncs) the pipeline makes.
    pub async fn write_batch(
        &self,
        batch: &[(&event::Model, Vec<i64>)],
        outcomes: &[Attempt],
        node: &str,
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> Result<()> {
        let txn = self.begin_write().await?;
        if !batch.is_empty() {
            insert_events(&txn, batch, node, lease_until).await?;
        }
        if !outcomes.is_empty() {
            record_attempts(&txn, outcomes).await?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Frees the leases `node` holds (a restarted server takes its own
    /// pending deliveries back at once instead of waiting them out).
    pub async fn release_leases(&self, node: &str) -> Result<u64> {
        let r = delivery::Entity::update_many()
            .col_expr(delivery::Column::LeaseUntil, no_lease().0)
            .col_expr(delivery::Column::LeasedBy, no_lease().1)
            .filter(delivery::Column::LeasedBy.eq(node))
            .filter(delivery::Column::State.eq(STATE_PENDING))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected)
    }

    /// Claims up to `limit` due pending deliveries whose lease is free or
    /// expired, leasing them to `node`; returns each with its event and
    /// endpoint. Rows another server is claiming at the same moment are
    /// skipped (`FOR UPDATE SKIP LOCKED` where the database has it).
    pub async fn claim_due(
        &self,
        node: &str,
        lease_until: chrono::DateTime<chrono::Utc>,
        limit: u64,
    ) -> Result<Vec<(delivery::Model, event::Model, endpoint::Model)>> {
        use sea_orm::{QuerySelect, sea_query::LockBehavior, sea_query::LockType};
        let now = chrono::Utc::now();
        let txn = self.begin_write().await?;
        let mut q = delivery::Entity::find()
            .filter(delivery::Column::State.eq(STATE_PENDING))
            .filter(delivery::Column::NextAt.lte(now))
            .filter(
                sea_orm::Condition::any()
                    .add(delivery::Column::LeaseUntil.is_null())
                    .add(delivery::Column::LeaseUntil.lt(now)),
            )
            .order_by_asc(delivery::Column::NextAt)
            .limit(limit);
        if self.backend != DbBackend::Sqlite {
            q = q.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
        }
        let due = q.all(&txn).await?;
        if due.is_empty() {
            txn.commit().await?;
            return Ok(Vec::new());
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
        let events: std::collections::HashMap<String, event::Model> = event::Entity::find()
            .filter(event::Column::Id.is_in(event_ids))
            .all(&txn)
            .await?
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        let eps: std::collections::HashMap<i64, endpoint::Model> = endpoint::Entity::find()
            .filter(endpoint::Column::Id.is_in(ep_ids))
            .all(&txn)
            .await?
            .into_iter()
            .map(|e| (e.id, e))
            .collect();
        txn.commit().await?;
        Ok(due
            .into_iter()
            .filter_map(|d| {
                let e = events.get(&d.event_id)?.clone();
                let ep = eps.get(&d.endpoint_id)?.clone();
                Some((d, e, ep))
            })
            .collect())
    }

    // ---- events API --------------------------------------------------------

    /// The newest `limit` events of an address, newest first.
    pub async fn event_list(&self, addr_id: i64, limit: u64) -> Result<Vec<event::Model>> {
        use sea_orm::QuerySelect;
        Ok(event::Entity::find()
            .filter(event::Column::AddrId.eq(addr_id))
            .order_by_desc(event::Column::Created)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// One event of an address, with its deliveries.
    pub async fn event_get(
        &self,
        addr_id: i64,
        id: &str,
    ) -> Result<(event::Model, Vec<delivery::Model>)> {
        let e = event::Entity::find_by_id(id.to_string())
            .filter(event::Column::AddrId.eq(addr_id))
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

    /// Makes an event's failed deliveries pending again, due now.
    pub async fn event_retry(&self, addr_id: i64, id: &str) -> Result<u64> {
        self.event_get(addr_id, id).await?;
        let r = delivery::Entity::update_many()
            .col_expr(delivery::Column::State, Expr::value(STATE_PENDING))
            .col_expr(delivery::Column::NextAt, Expr::value(chrono::Utc::now()))
            .col_expr(delivery::Column::LeaseUntil, no_lease().0)
            .col_expr(delivery::Column::LeasedBy, no_lease().1)
            .col_expr(delivery::Column::Updated, Expr::value(chrono::Utc::now()))
            .filter(delivery::Column::EventId.eq(id))
            .filter(delivery::Column::State.eq(STATE_FAILED))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected)
    }

    /// Deletes events created before `before` that have nothing pending.
    pub async fn events_cleanup(&self, before: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        use sea_orm::QuerySelect;
        let pending: Vec<String> = delivery::Entity::find()
            .select_only()
            .column(delivery::Column::EventId)
            .filter(delivery::Column::State.eq(STATE_PENDING))
            .into_tuple()
            .all(&self.db)
            .await?;
        let old: Vec<String> = event::Entity::find()
            .select_only()
            .column(event::Column::Id)
            .filter(event::Column::Created.lt(before))
            .into_tuple()
            .all(&self.db)
            .await?;
        let pending: std::collections::HashSet<String> = pending.into_iter().collect();
        let doomed: Vec<String> = old.into_iter().filter(|id| !pending.contains(id)).collect();
        let mut n = 0;
        for chunk in doomed.chunks(500) {
            let txn = self.begin_write().await?;
            delivery::Entity::delete_many()
                .filter(delivery::Column::EventId.is_in(chunk.to_vec()))
                .exec(&txn)
                .await?;
            n += event::Entity::delete_many()
                .filter(event::Column::Id.is_in(chunk.to_vec()))
                .exec(&txn)
                .await?
                .rows_affected;
            txn.commit().await?;
        }
        Ok(n)
    }

    // ---- housekeeping ----------------------------------------------------

    /// Deletes bucket objects past their expiry; returns how many.
    pub async fn bucket_cleanup(&self) -> Result<u64> {
        let now = chrono::Utc::now();
        let r = bucket::Entity::delete_many()
            .filter(bucket::Column::ExpiresAt.lte(now))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected)
    }

    /// Counts one message of `size` bytes against an address's limits in
    /// the window starting at `window_start`, if it fits under `max_c`
    /// messages and `max_s` bytes; returns false (and counts nothing)
    /// when it does not. Each step is one atomic statement, so servers
    /// sharing the database share the counters.
    pub async fn count_message(
        &self,
        addr_id: i64,
        window_start: i64,
        size: i64,
        max_c: i64,
        max_s: i64,
    ) -> Result<bool> {
        use sea_orm::sea_query::OnConflict;
        // The usual case: this window's row exists and has room.
        let r = addr_limit::Entity::update_many()
            .col_expr(
                addr_limit::Column::Count,
                Expr::col(addr_limit::Column::Count).add(1),
            )
            .col_expr(
                addr_limit::Column::Size,
                Expr::col(addr_limit::Column::Size).add(size),
            )
            .filter(addr_limit::Column::AddrId.eq(addr_id))
            .filter(addr_limit::Column::WindowStart.eq(window_start))
            .filter(addr_limit::Column::Count.lt(max_c))
            .filter(Expr::col(addr_limit::Column::Size).add(size).lte(max_s))
            .exec(&self.db)
            .await?;
        if r.rows_affected == 1 {
            return Ok(true);
        }
        if max_c < 1 || size > max_s {
            return Ok(false);
        }
        // A new window: start it with this message.
        let r = addr_limit::Entity::update_many()
            .col_expr(addr_limit::Column::WindowStart, Expr::value(window_start))
            .col_expr(addr_limit::Column::Count, Expr::value(1))
            .col_expr(addr_limit::Column::Size, Expr::value(size))
            .filter(addr_limit::Column::AddrId.eq(addr_id))
            .filter(addr_limit::Column::WindowStart.lt(window_start))
            .exec(&self.db)
            .await?;
        if r.rows_affected == 1 {
            return Ok(true);
        }
        // The address's first message (or counters were reset).
        let inserted = addr_limit::Entity::insert(addr_limit::ActiveModel {
            addr_id: Set(addr_id),
            window_start: Set(window_start),
            count: Set(1),
            size: Set(size),
        })
        .on_conflict(
            OnConflict::column(addr_limit::Column::AddrId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await?;
        Ok(inserted == 1)
    }

    /// The counters of an address's current window (for 429 messages).
    pub async fn limit_counters(&self, addr_id: i64) -> Result<Option<addr_limit::Model>> {
        Ok(addr_limit::Entity::find_by_id(addr_id)
            .one(&self.db)
            .await?)
    }

    /// Forgets every address's limit counters.
    pub async fn reset_addr_limits(&self) -> Result<()> {
        addr_limit::Entity::delete_many().exec(&self.db).await?;
        Ok(())
    }
}

/// Deletes what hangs off one address (or all of them) explicitly, so the
/// cascade holds even on a database whose foreign keys are off.
async fn delete_addr_children<C: ConnectionTrait>(c: &C, addr_id: Option<i64>) -> Result<()> {
    let mut endpoints = endpoint::Entity::find();
    if let Some(id) = addr_id {
        endpoints = endpoints.filter(endpoint::Column::AddrId.eq(id));
    }
    let ep_ids = endpoints
        .all(c)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect::<Vec<_>>();
    if !ep_ids.is_empty() {
        delivery::Entity::delete_many()
            .filter(delivery::Column::EndpointId.is_in(ep_ids.clone()))
            .exec(c)
            .await?;
        subscription::Entity::delete_many()
            .filter(subscription::Column::EndpointId.is_in(ep_ids))
            .exec(c)
            .await?;
    }
    let mut del_events = event::Entity::delete_many();
    if let Some(id) = addr_id {
        del_events = del_events.filter(event::Column::AddrId.eq(id));
    }
    del_events.exec(c).await?;
    let mut del_ep = endpoint::Entity::delete_many();
    let mut del_bucket = bucket::Entity::delete_many();
    let mut del_lim = addr_limit::Entity::delete_many();
    if let Some(id) = addr_id {
        del_ep = del_ep.filter(endpoint::Column::AddrId.eq(id));
        del_bucket = del_bucket.filter(bucket::Column::AddrId.eq(id));
        del_lim = del_lim.filter(addr_limit::Column::AddrId.eq(id));
    } else {
        del_bucket = del_bucket.filter(bucket::Column::AddrId.is_not_null());
    }
    del_ep.exec(c).await?;
    del_bucket.exec(c).await?;
    del_lim.exec(c).await?;
    Ok(())
}

/// The values of a delivery's lease columns when nobody holds it.
fn no_lease() -> (Expr, Expr) {
    (
        Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
        Expr::value(Option::<String>::None),
    )
}

fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

fn sqlite_parent_dir(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://")?;
    let path = rest.split('?').next()?;
    if path.is_empty() || path.starts_with(':') {
        return None;
    }
    std::path::Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(std::path::Path::to_path_buf)
}

/// Inserts accepted events and their deliveries (see [`Store::write_batch`]).
async fn insert_events(
    txn: &sea_orm::DatabaseTransaction,
    batch: &[(&event::Model, Vec<i64>)],
    node: &str,
    lease_until: chrono::DateTime<chrono::Utc>,
) -> Result<()> {
    let now = chrono::Utc::now();
    // Chunks keep each statement under every backend's limit on bound
    // parameters (SQLite's is 32766).
    for chunk in batch.chunks(INSERT_CHUNK / 16) {
        event::Entity::insert_many(
            chunk
                .iter()
                .map(|(e, _)| event::ActiveModel::from((*e).clone())),
        )
        .exec_without_returning(txn)
        .await?;
    }
    let deliveries: Vec<delivery::ActiveModel> = batch
        .iter()
        .flat_map(|(e, eps)| {
            eps.iter().map(move |ep| delivery::ActiveModel {
                event_id: Set(e.id.clone()),
                endpoint_id: Set(*ep),
                state: Set(STATE_PENDING.into()),
                attempts: Set(0),
                next_at: Set(now),
                lease_until: Set(Some(lease_until)),
                leased_by: Set(Some(node.to_string())),
                last_error: Set(None),
                created: Set(now),
                updated: Set(now),
                ..Default::default()
            })
        })
        .collect();
    for chunk in deliveries.chunks(INSERT_CHUNK / 16) {
        delivery::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(txn)
            .await?;
    }
    Ok(())
}

/// Records the outcome of delivery attempts. Successes (the bulk) share
/// their values, so they are written one statement per endpoint and
/// attempt count; the rest row by row.
async fn record_attempts(txn: &sea_orm::DatabaseTransaction, outcomes: &[Attempt]) -> Result<()> {
    let now = chrono::Utc::now();
    let mut delivered: std::collections::BTreeMap<(i64, i32), Vec<&str>> = Default::default();
    let mut others = Vec::new();
    for o in outcomes {
        if o.state == STATE_DELIVERED && o.error.is_none() && o.next_at.is_none() {
            delivered
                .entry((o.endpoint_id, o.attempts))
                .or_default()
                .push(o.event_id.as_str());
        } else {
            others.push(o);
        }
    }
    for ((endpoint_id, attempts), events) in delivered {
        for chunk in events.chunks(INSERT_CHUNK) {
            delivery::Entity::update_many()
                .col_expr(delivery::Column::Attempts, Expr::value(attempts))
                .col_expr(delivery::Column::State, Expr::value(STATE_DELIVERED))
                .col_expr(
                    delivery::Column::LastError,
                    Expr::value(Option::<String>::None),
                )
                .col_expr(delivery::Column::Updated, Expr::value(now))
                .col_expr(delivery::Column::LeaseUntil, no_lease().0)
                .col_expr(delivery::Column::LeasedBy, no_lease().1)
                .filter(delivery::Column::EndpointId.eq(endpoint_id))
                .filter(delivery::Column::EventId.is_in(chunk.iter().copied()))
                .exec(txn)
                .await?;
        }
    }
    for o in others {
        let mut q = delivery::Entity::update_many()
            .col_expr(delivery::Column::Attempts, Expr::value(o.attempts))
            .col_expr(delivery::Column::State, Expr::value(o.state))
            .col_expr(delivery::Column::LastError, Expr::value(o.error.clone()))
            .col_expr(delivery::Column::Updated, Expr::value(now))
            .col_expr(delivery::Column::LeaseUntil, no_lease().0)
            .col_expr(delivery::Column::LeasedBy, no_lease().1);
        if let Some(next) = o.next_at {
            q = q.col_expr(delivery::Column::NextAt, Expr::value(next));
        }
        q.filter(delivery::Column::EventId.eq(o.event_id.as_str()))
            .filter(delivery::Column::EndpointId.eq(o.endpoint_id))
            .exec(txn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_refs() {
        assert_eq!(AddrRef::parse("12"), AddrRef::Id(12));
        assert_eq!(AddrRef::parse("abc"), AddrRef::A("abc".into()));
        let digits = "1".repeat(64);
        assert_eq!(AddrRef::parse(&digits), AddrRef::A(digits.clone()));
    }
}
